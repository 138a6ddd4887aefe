"""Tests of self-calibration (``refiner="auto"``): synthetic defects pasted into held-out support images
choose the refinement setting of a task without any test image."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_protorefine.calibration import augment, calibrate, paste_defects, split_transform

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _flat_images(k: int, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(k)
    return (0.5 + 0.01 * torch.randn(k, 3, *size, generator=gen)).clamp(0, 1)


@pytest.mark.parametrize("size", [(64, 64), (40, 96)])
def test_paste_defects_is_seeded_and_local(size: tuple[int, int]) -> None:
    image = _flat_images(1, size)[0]
    painted, mask = paste_defects(image, seed=3, count=2)
    again, mask_again = paste_defects(image, seed=3, count=2)
    assert painted.shape == image.shape
    assert mask.shape == size
    torch.testing.assert_close(painted, again)
    assert torch.equal(mask, mask_again)
    assert mask.any()
    assert mask.float().mean() < 0.5
    change = (painted - image).abs().amax(0)
    assert change[mask].mean() > 5 * change[~mask].mean()  # the defect is where the mask says
    other, _ = paste_defects(image, seed=4, count=2)
    assert not torch.equal(other, painted)


def test_augment_is_mild_and_seeded() -> None:
    image = torch.rand(3, 32, 48)
    out = augment(image, seed=1)
    assert out.shape == image.shape
    assert out.min() >= 0
    assert out.max() <= 1
    torch.testing.assert_close(out, augment(image, seed=1))
    assert not torch.equal(out, augment(image, seed=2))


def test_split_transform() -> None:
    resize, normalize = Resize((8, 8)), Normalize([0.5] * 3, [0.25] * 3)
    geometric, photometric = split_transform(Compose([resize, normalize]))
    image = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(photometric(geometric(image)), normalize(resize(image)))
    assert split_transform(None)[0] is None
    assert torch.equal(split_transform(None)[1](image), image)
    with pytest.raises(ValueError, match="refiner='auto'"):
        split_transform(Compose([resize]))


class _Recorder:
    """fit_bank that records the bank sizes it was given and returns the patch grid of 8 x 8 patches."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, images: torch.Tensor) -> tuple[int, int]:
        self.sizes.append(images.shape[0])
        return images.shape[-2] // 8, images.shape[-1] // 8


def _deviation(images: torch.Tensor) -> torch.Tensor:
    """A perfect detector for flat grey images: per-patch deviation from grey."""
    return F.avg_pool2d((images - 0.5).abs().mean(1, keepdim=True), 8).flatten(1)


def _noise(images: torch.Tensor) -> torch.Tensor:
    return torch.rand(images.shape[0], (images.shape[-2] // 8) * (images.shape[-1] // 8))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("order", [("noise", "detector"), ("detector", "noise")])
def test_calibrate_picks_the_candidate_that_finds_pasted_defects(k: int, order: tuple[str, str]) -> None:
    scorers = {"noise": _noise, "detector": _deviation}
    fit_bank = _Recorder()
    result = calibrate(_flat_images(k), lambda x: x, fit_bank, {name: scorers[name] for name in order}, seed=0)
    assert result.choice == "detector"
    assert set(result.scores) == set(order)
    assert result.scores["detector"] > 1.7  # patch AUROC + image AUROC (k = 1: augmented copies blur it)
    assert result.scores["noise"] < 1.5
    # k >= 2: leave-one-out (k banks of k - 1 images); k = 1: one bank of the image itself.
    assert fit_bank.sizes == ([k - 1] * k if k > 1 else [1])


def test_calibrate_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="raw_images"):
        calibrate(torch.empty(0, 3, 8, 8), lambda x: x, _Recorder(), {"a": _noise})
    with pytest.raises(ValueError, match="scorers"):
        calibrate(_flat_images(2), lambda x: x, _Recorder(), {})
