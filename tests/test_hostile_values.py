"""Values a hostile tester tries after construction or at the edges: each refused in one line naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_protorefine import PatchCorePlus
from anomalib_protorefine.refinement import PrototypeRefiner

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def small_model(**kwargs: object) -> PatchCorePlus:
    """A 64 px resnet18 PatchCorePlus without downloads."""
    kwargs = {"backbone": "resnet18", "layers": ("layer2",), "pre_trained": False, "k_shot": 2, **kwargs}
    model = PatchCorePlus(**kwargs)  # type: ignore[arg-type]
    model.pre_processor = PatchCorePlus.configure_pre_processor(image_size=(64, 64), backbone="resnet18")
    return model


def test_adam_step_size_far_beyond_the_weights_is_refused_naming_lr() -> None:
    """Adam moves each weight by about lr % of the mean weight per step: 1e300 overflows, 100 is the bound."""
    with pytest.raises(ValueError, match=r"^lr=1e\+300 with optimizer='adam'.*Use lr in \(0, 100\]"):
        PrototypeRefiner(m_step="gradient", optimizer="adam", lr=1e300)
    with pytest.raises(ValueError, match=r"lr=1e\+300"):
        small_model(refiner={"m_step": "gradient", "optimizer": "adam", "lr": 1e300})
    assert PrototypeRefiner(m_step="gradient", optimizer="adam", lr=100.0).options.lr == 100.0


def test_adam_at_the_bound_scores_finite() -> None:
    """At the largest accepted step size the refined scores stay finite (the bound is not too loose to run)."""
    model = small_model(k_shot=1, refiner={"m_step": "gradient", "optimizer": "adam", "lr": 100.0})
    generator = torch.Generator().manual_seed(0)
    model.fit_support(torch.rand(1, 3, 64, 64, generator=generator))
    model.eval()
    with torch.no_grad():
        scores = model.model(torch.rand(2, 3, 64, 64, generator=generator)).pred_score
    assert torch.isfinite(scores).all()


def test_fit_support_names_non_finite_values() -> None:
    """One inf value is named as non-finite, not as 0-255 pixel values."""
    images = torch.rand(2, 3, 64, 64)
    images[1, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match=r"^images hold 1 non-finite value\(s\) \(NaN or inf\) in 1 image\(s\)"):
        small_model().fit_support(images)


@pytest.mark.parametrize("channels", [1, 4])
def test_fit_support_names_the_channel_count(channels: int) -> None:
    """Grayscale or RGBA tensors get one line with the channel count and the fix, not a convolution error."""
    with pytest.raises(ValueError, match=rf"^images have {channels} channel\(s\).*images\.expand\(-1, 3, -1, -1\)"):
        small_model().fit_support(torch.rand(2, channels, 64, 64))


def test_threshold_set_after_construction_is_checked() -> None:
    """``m.threshold = "bogus"`` is refused as the constructor refuses it; a valid value reaches the post-processor."""
    model = small_model()
    with pytest.raises(ValueError, match=r"^threshold='bogus' is not a threshold source"):
        model.threshold = "bogus"
    assert model.threshold == "auto"
    model.threshold = "support"
    assert model.post_processor.threshold == "support"
    assert model.hparams["threshold"] == "support"


def test_threshold_validation_with_calibration_source_is_refused_after_construction(tmp_path: Path) -> None:
    """The constructor's conflict between calibration_source and threshold='validation' holds for the setter."""
    model = small_model(calibration_source=tmp_path)
    with pytest.raises(ValueError, match=r"^threshold='validation'.*calibration_source"):
        model.threshold = "validation"


def test_k_shot_none_with_few_shot_source_or_augmentation_is_refused(tmp_path: Path) -> None:
    """``m.k_shot = None`` while options that need support images are set: refused, k_shot unchanged."""
    with_source = small_model(few_shot_source=tmp_path)
    with pytest.raises(ValueError, match=r"^k_shot=None but few_shot_source="):
        with_source.k_shot = None
    assert with_source.k_shot == 2
    with_augmentation = small_model(support_augmentation="flips")
    with pytest.raises(ValueError, match=r"^k_shot=None but support_augmentation=\['hflip', 'vflip'\]"):
        with_augmentation.k_shot = None
    with_support_thresholds = small_model(threshold="support")
    with pytest.raises(ValueError, match=r"^threshold='support' computes the thresholds"):
        with_support_thresholds.k_shot = None
    plain = small_model()
    plain.k_shot = None
    assert plain.k_shot is None
