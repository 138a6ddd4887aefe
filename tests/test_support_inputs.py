"""Support image files and support options as users give them: resizes that ring, numpy integers, float TIFFs,
degenerate and truncated files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from anomalib.data.utils import read_image
from PIL import Image
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_protorefine import AnomalyDINOPlus, PatchCorePlus, WinClipPlus
from anomalib_protorefine.backbones import IMAGENET_MEAN, IMAGENET_STD
from anomalib_protorefine.few_shot import load_images, read_image_file, support_from_folder, validate_k_shot
from anomalib_protorefine.pre_processing import AntialiasPreProcessor

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DINO_SIZE = 56  # 4 x 4 patches of 14 px


def patchcore_bicubic(**kwargs: object) -> PatchCorePlus:
    """A small PatchCorePlus whose resize is bicubic (its default bilinear resize never rings)."""
    transform = Compose(
        [
            Resize((64, 64), antialias=True, interpolation=InterpolationMode.BICUBIC),
            Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    options = {"backbone": "resnet18", "layers": ("layer2",), "pre_trained": False, "refiner": False}
    torch.manual_seed(0)  # the same random backbone in every model built here
    return PatchCorePlus(**{**options, "pre_processor": AntialiasPreProcessor(transform=transform), **kwargs})


def small_dino(**kwargs: object) -> AnomalyDINOPlus:
    torch.manual_seed(0)  # the same random encoder in every model built here
    pre_processor = AnomalyDINOPlus.configure_pre_processor((DINO_SIZE, DINO_SIZE))
    return AnomalyDINOPlus(pre_trained=False, pre_processor=pre_processor, visualizer=False, **kwargs)


def tiny_winclip(tiny_json: str, **kwargs: object) -> WinClipPlus:
    torch.manual_seed(0)
    return WinClipPlus(backbone=tiny_json, pretrained=None, class_name="widget", visualizer=False, **kwargs)


def sharp_edged_files(folder: Path, count: int = 2, size: int = 37) -> list[Path]:
    """Black-and-white noise: every pixel is an edge, where a bicubic resize rings past [0, 1]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = (rng.random((size, size, 3)) > 0.5).astype(np.uint8) * 255
        paths.append(folder / f"edges_{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def noise_files(folder: Path, count: int, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index in range(count):
        paths.append(folder / f"noise_{index}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


# ------------------------------------------------------------------------------ resizes that ring past [0, 1]
@pytest.mark.parametrize("model_name", ["PatchCorePlus", "AnomalyDINOPlus", "WinClipPlus"])
def test_support_thresholds_accept_files_whose_resize_rings_past_one(
    model_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Valid [0, 1] files whose bicubic resize to the input size overshoots: thresholds come out, no range error."""
    if model_name == "PatchCorePlus":
        model = patchcore_bicubic(k_shot=2)
    elif model_name == "AnomalyDINOPlus":
        model = small_dino(k_shot=2)
    else:
        model = tiny_winclip(request.getfixturevalue("tiny_json"), k_shot=2, refiner=False)
        model.model.setup("widget")  # the text embeddings, which scoring needs
    paths = sharp_edged_files(tmp_path)
    size = model.pre_processor.transform.transforms[0].size
    # The overshoot itself, from torchvision alone: the files hold [0, 1], their resize does not.
    resized = Resize(size, antialias=True, interpolation=InterpolationMode.BICUBIC)(read_image(str(paths[0]), True))
    assert float(read_image(str(paths[0]), True).max()) <= 1.0
    assert float(resized.max()) > 1.05
    assert float(resized.min()) < -0.05
    thresholds = model.calibrate_thresholds([str(path) for path in paths])
    assert thresholds is not None
    assert np.isfinite(thresholds.image_threshold)


def test_support_thresholds_still_refuse_0_255_images() -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    with pytest.raises(ValueError, match=r"divide 0-255 values by 255"):
        patchcore_bicubic(k_shot=2).calibrate_thresholds_from_images(images)


# ------------------------------------------------------------------------------ numpy integers
def test_validate_k_shot_accepts_numpy_integers_and_returns_plain_ints() -> None:
    value = validate_k_shot(np.int64(2))
    assert value == 2
    assert type(value) is int
    with pytest.raises(ValueError, match="k_shot must be a positive integer"):
        validate_k_shot(np.int64(0))
    with pytest.raises(ValueError, match="k_shot must be a positive integer"):
        validate_k_shot(np.float64(2.0))


def build_model(name: str, request: pytest.FixtureRequest, **kwargs: object) -> PatchCorePlus | AnomalyDINOPlus:
    if name == "PatchCorePlus":
        return patchcore_bicubic(visualizer=False, **kwargs)
    if name == "AnomalyDINOPlus":
        return small_dino(**kwargs)
    return tiny_winclip(request.getfixturevalue("tiny_json"), refiner=False, **kwargs)


@pytest.mark.parametrize(
    "model_name",
    ["PatchCorePlus", "AnomalyDINOPlus", "WinClipPlus"],
)
def test_numpy_integer_support_options_run_end_to_end_as_plain_ints(
    model_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """k_shot=np.int64(2), few_shot_seed=np.int64(3): the same support, thresholds and scores as the plain ints."""
    source = tmp_path / "good"
    noise_files(source, count=4)
    numpy_model = build_model(
        model_name, request, k_shot=np.int64(2), few_shot_seed=np.int64(3), few_shot_source=source
    )
    plain_model = build_model(model_name, request, k_shot=2, few_shot_seed=3, few_shot_source=source)
    for model in (numpy_model, plain_model):
        model._ensure_ready()
    assert numpy_model.support_paths == plain_model.support_paths
    assert numpy_model.support_thresholds == plain_model.support_thresholds
    queries = numpy_model.pre_processor.transform(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    numpy_model.model.eval()
    plain_model.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(numpy_model.model(queries).pred_score, plain_model.model(queries).pred_score)
    for name in ("k_shot", "few_shot_seed"):
        assert type(getattr(numpy_model, name)) is int
        for hparams in (numpy_model.hparams, numpy_model.hparams_initial):
            assert type(hparams[name]) is int, f"hparams[{name!r}] is {type(hparams[name]).__name__}"
    yaml.safe_dump({name: numpy_model.hparams_initial[name] for name in ("k_shot", "few_shot_seed")})


def test_numpy_integer_refiner_options_are_stored_as_plain_numbers() -> None:
    model = small_dino(refiner={"num_iterations": np.int64(3), "lambda_": np.float32(0.25)})
    options = model.model.refiner.options.as_dict()
    assert (type(options["num_iterations"]), options["num_iterations"]) == (int, 3)
    assert (type(options["lambda_"]), options["lambda_"]) == (float, 0.25)
    yaml.safe_dump(dict(model.hparams))


# ------------------------------------------------------------------------------ float TIFF
def test_a_float_tiff_in_zero_one_is_read_as_its_values(tmp_path: Path) -> None:
    """A 32-bit float TIFF (Pillow mode "F") holds [0, 1] values: they are the image (anomalib reads zeros)."""
    values = np.random.default_rng(0).random((24, 32)).astype(np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "F"
    assert float(read_image(str(path), as_tensor=True).abs().max()) == 0.0  # upstream: all zeros
    expected = torch.from_numpy(values)[None].expand(3, -1, -1)
    torch.testing.assert_close(read_image_file(path), expected, rtol=0, atol=0)
    support = support_from_folder(tmp_path, k_shot=1, seed=0, transform=None)
    torch.testing.assert_close(support.images[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("values", [np.full((20, 20), 200.0), np.full((20, 20), np.nan)])
def test_a_float_tiff_outside_zero_one_is_refused_naming_the_file(tmp_path: Path, values: np.ndarray) -> None:
    path = tmp_path / "scaled.tif"
    Image.fromarray(values.astype(np.float32)).save(path)
    with pytest.raises(OSError, match=r"scaled\.tif.*float image.*\[0, 1\]"):
        load_images([path], None)


# ------------------------------------------------------------------------------ degenerate and truncated files
def test_one_pixel_and_all_black_support_images_are_named_in_a_warning(tmp_path: Path) -> None:
    noise_files(tmp_path, count=1)
    Image.new("RGB", (1, 1), (120, 30, 200)).save(tmp_path / "dot.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "black.png")
    with pytest.warns(UserWarning, match=r"2 support image\(s\) hold nothing") as caught:
        support_from_folder(tmp_path, k_shot=3, seed=0, transform=Resize((64, 64)))
    message = str(caught[0].message)
    assert "dot.png" in message
    assert "1 x 1 px" in message
    assert "black.png" in message
    assert "one flat colour" in message
    assert "noise_0.png" not in message


def test_ordinary_support_images_raise_no_warning(tmp_path: Path) -> None:
    noise_files(tmp_path, count=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        support_from_folder(tmp_path, k_shot=2, seed=0, transform=None)


def test_a_truncated_jpeg_support_image_is_named(tmp_path: Path) -> None:
    noise_files(tmp_path, count=1)
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cut.jpg", quality=90)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"Could not read calibration image '.*cut\.jpg'.*truncated"):
        load_images(sorted(tmp_path.iterdir()), None, what="calibration image")
