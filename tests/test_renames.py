"""Renamed public names: the old name still works, warns once per use, and is the same object."""

from __future__ import annotations

import importlib

import pytest
import torch

import anomalib_protorefine
from anomalib_protorefine.refinement import PrototypeRefiner


@pytest.mark.parametrize(
    "module", ["anomalib_protorefine", "anomalib_protorefine.models", "anomalib_protorefine.models.patchcore_plus"]
)
def test_old_torch_model_name_is_the_new_class_with_a_warning(module: str) -> None:
    from anomalib_protorefine.models.patchcore_plus.torch_model import PatchCorePlusModel

    with pytest.warns(FutureWarning, match=r"PatchcorePlusModel is deprecated: use PatchCorePlusModel"):
        old = importlib.import_module(module).PatchcorePlusModel
    assert old is PatchCorePlusModel


def test_unknown_names_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchModel"):
        _ = anomalib_protorefine.models.NoSuchModel
    with pytest.raises(AttributeError, match="NoSuchModel"):
        _ = anomalib_protorefine.NoSuchModel


def test_result_weights_is_the_transform_with_a_warning() -> None:
    result = PrototypeRefiner(num_iterations=2).refine(torch.randn(1, 6, 4), torch.randn(5, 4))
    with pytest.warns(FutureWarning, match=r"RefinementResult.weights is deprecated: use RefinementResult.transform"):
        old = result.weights
    assert old is result.transform
    torch.testing.assert_close(result.prototypes, result.transform @ result.factors.bank)


def test_scoring_bank_method_is_reference_bank_with_a_warning() -> None:
    from anomalib_protorefine.models import PatchCorePlusModel

    model = PatchCorePlusModel(backbone="resnet18", layers=("layer2",), pre_trained=False, online=True)
    model.memory_bank = torch.randn(7, 4)
    model.online_bank = torch.randn(3, 4)
    with pytest.warns(FutureWarning, match=r"scoring_bank\(\) is deprecated: use PatchCorePlusModel.reference_bank"):
        old = model.scoring_bank()
    torch.testing.assert_close(old, torch.cat((model.memory_bank, model.online_bank)))


def test_open_clip_weight_resolution_moved_with_a_warning() -> None:
    from anomalib_protorefine import clip_weights
    from anomalib_protorefine.models.winclip_plus import torch_model

    with pytest.warns(FutureWarning, match=r"torch_model.resolve_pretrained is deprecated: use .*clip_weights"):
        old = torch_model.resolve_pretrained
    assert old is clip_weights.resolve_pretrained
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = torch_model.no_such_name


def test_the_lazy_package_lists_the_same_renames_as_the_model_module() -> None:
    from anomalib_protorefine.models.patchcore_plus import torch_model

    assert anomalib_protorefine._RENAMED == torch_model.RENAMED
