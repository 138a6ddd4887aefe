"""The few-shot model contract: each model fills in what :class:`FewShotModel` leaves to it."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch

from anomalib_protorefine import AnomalyDINOPlus, PatchCorePlus, WinClipPlus
from anomalib_protorefine.models import FEW_SHOT_MODELS
from anomalib_protorefine.models.anomaly_dino_plus.torch_model import AnomalyDINOPlusModel
from anomalib_protorefine.models.base import FewShotModel
from anomalib_protorefine.models.contract import FewShotTorchModel, MemoryBankTorchModel
from anomalib_protorefine.models.patchcore_plus.torch_model import PatchCorePlusModel
from anomalib_protorefine.models.winclip_plus import tiny_clip
from anomalib_protorefine.models.winclip_plus.torch_model import WinClipPlusModel

MODELS = tuple(FEW_SHOT_MODELS.values())


def test_the_registry_holds_the_three_models() -> None:
    assert set(MODELS) == {PatchCorePlus, AnomalyDINOPlus, WinClipPlus}


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
def test_every_model_implements_what_the_base_leaves_open(model: type) -> None:
    for name in ("fit_support", "_ensure_ready", "_support_ready", "_reset_support"):
        assert getattr(model, name) is not getattr(FewShotModel, name), f"{model.__name__}.{name}"
    assert model.refiner_default_preset in model.refiner_presets
    arguments = set(inspect.signature(model.__init__).parameters)
    restored = [option.name for option in model.score_options]
    assert set(restored) <= arguments, set(restored) - arguments  # a checkpoint restores constructor arguments
    assert len(restored) == len(set(restored))
    assert restored.index("k_shot") < restored.index("few_shot_source")  # the source needs k_shot


@pytest.mark.parametrize(
    "build",
    [
        lambda: PatchCorePlusModel(layers=["layer2"], backbone="resnet18", pre_trained=False),
        lambda: AnomalyDINOPlusModel(pre_trained=False),
        lambda: WinClipPlusModel(backbone=tiny_clip.TINY_NAME, pretrained=None),
    ],
    ids=["patchcore", "dino", "winclip"],
)
def test_torch_models_offer_the_declared_interface(build: Callable[[], torch.nn.Module], tiny_json: str) -> None:
    del tiny_json  # registers the tiny CLIP architecture
    torch.manual_seed(0)
    model = build()
    assert isinstance(model, FewShotTorchModel)
    assert isinstance(model, MemoryBankTorchModel) == (not isinstance(model, WinClipPlusModel))
    assert model.refinement_stats == {}  # no refiner, or none run yet


def test_the_protocols_reject_a_model_without_the_interface() -> None:
    assert not isinstance(torch.nn.Linear(2, 2), FewShotTorchModel)
