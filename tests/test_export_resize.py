"""Exported models decide like ``Engine.predict`` on original images of any size, in every runtime.

The exported pre-processing resizes with :class:`~anomalib_protorefine.pre_processing.SeparableResize`
(torch's antialiasing weights as two matrix products). References: torch's own antialiased
``F.interpolate`` for the resize; for the decisions, the ``Engine.predict`` path in torch
(torchvision's ``Resize``, the model, the post-processor) on non-square PNGs of other sizes, against
ONNX Runtime, OpenVINO through anomalib's ``OpenVINOInferencer``, and the exported torch forward.
Before this resize, OpenVINO's antialiased ``Resize`` put the normalised scores off by up to 1.3x here
(6 of 12 decisions flipped, bilinear and bicubic alike).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils import read_image
from PIL import Image
from torch.nn import functional
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_protorefine.pre_processing import (
    AntialiasPreProcessor,
    SeparableResize,
    exportable_transform,
    separable_resize,
)
from anomalib_protorefine.thresholds import SupportThresholds
from test_false_alarm import SIZE, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

#: Original image sizes (height, width): non-square, larger and smaller than the model's input.
SHAPES = ((200, 300), (131, 97))
#: Exported scores vs Engine.predict's, relative (measured: 2e-6 ONNX Runtime, 4e-6 OpenVINO).
RTOL = 1e-4
MODES = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("height", "width"), [(200, 300), (131, 97), (64, 64), (30, 50), (1000, 700)])
def test_separable_resize_is_torchs_antialiased_resize(mode: InterpolationMode, height: int, width: int) -> None:
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height))
    for size in ((64, 64), (256, 192)):
        reference = functional.interpolate(images, size, mode=mode.value, antialias=True, align_corners=False)
        assert (separable_resize(images, size, mode) - reference).abs().max() < 2e-6


def test_only_antialiased_two_sided_resizes_are_replaced() -> None:
    transform = Compose(
        [Resize((8, 8), antialias=True), Resize(8), Resize((8, 8), interpolation=InterpolationMode.NEAREST)]
    )
    exported = exportable_transform(transform).transforms
    assert [type(item) for item in exported] == [SeparableResize, Resize, Resize]
    assert type(transform.transforms[0]) is Resize  # the Lightning loops keep torchvision's resize


def test_separable_resize_names_what_it_cannot_compute() -> None:
    with pytest.raises(ValueError, match=r"size=\(height, width\)"):
        SeparableResize((8,))
    with pytest.raises(ValueError, match=r"interpolation BILINEAR or BICUBIC.*keep torchvision's Resize"):
        SeparableResize((8, 8), InterpolationMode.NEAREST)


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """Blocky random texture with fine noise (the antialiasing filter matters), as uint8 RGB."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.random((height // 4 + 2, width // 4 + 2, 3)), np.ones((4, 4, 1)))[:height, :width]
    return ((0.6 * blocks + 0.4 * rng.random((height, width, 3))) * 255).astype(np.uint8)


@pytest.mark.parametrize("mode", MODES)
def test_onnx_openvino_and_torch_exports_decide_like_engine_predict_on_other_sizes(
    mode: InterpolationMode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra: pip install '.[export]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs the export extra")
    pytest.importorskip("openvino", reason="OpenVINO is part of the export extra: pip install '.[export]'")
    from anomalib.deploy import OpenVINOInferencer

    transform = Compose(
        [Resize((SIZE, SIZE), antialias=True, interpolation=mode), Normalize([0.485, 0.456, 0.406], [0.229] * 3)]
    )
    model = tiny_model(pre_processor=AntialiasPreProcessor(transform))
    support = torch.stack([torch.from_numpy(_texture(200, 300, seed)).permute(2, 0, 1) / 255 for seed in (0, 1)])
    model.fit_support(transform(support))
    model.eval()
    files = []
    for index, (height, width) in enumerate([shape for shape in SHAPES for _ in range(4)]):
        files.append(tmp_path / f"part{index}_{height}x{width}.png")
        Image.fromarray(_texture(height, width, 100 + index)).save(files[-1])

    def engine_predict_path(path: Path) -> tuple[float, float, bool]:
        """What Engine.predict computes: torchvision's resize, the model, the post-processor."""
        with torch.no_grad():
            raw = model.model(transform(read_image(path, as_tensor=True))[None])
            post = model.post_processor(raw)
        return float(raw.pred_score), float(post.pred_score), bool(post.pred_label)

    raw = [engine_predict_path(path)[0] for path in files]
    middle, low, high = float(np.median(raw)), min(raw), max(raw)  # thresholds that split the parts
    model.post_processor.set_support_thresholds(
        SupportThresholds(middle, middle, low, high, low, high, 0.0, 2, 2, True)
    )
    expected = {path: engine_predict_path(path)[1:] for path in files}
    assert {label for _, label in expected.values()} == {False, True}

    session = ort.InferenceSession(str(model.to_onnx(tmp_path / "onnx")), providers=["CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="float32"):
        openvino = OpenVINOInferencer(
            model.to_openvino(tmp_path / "openvino"), device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}
        )
    names = [output.name for output in session.get_outputs()]
    for path, (score, label) in expected.items():
        image = read_image(path, as_tensor=True)[None]
        onnx = dict(zip(names, session.run(None, {"input": image.numpy()}), strict=True))
        vino = openvino.predict(str(path))
        with torch.no_grad():
            exported_torch = model(image)  # what TorchInferencer runs
        for other_score, other_label in (
            (onnx["pred_score"], onnx["pred_label"]),
            (vino.pred_score, vino.pred_label),
            (exported_torch.pred_score, exported_torch.pred_label),
        ):
            assert float(np.asarray(other_score).reshape(())) == pytest.approx(score, rel=RTOL), path.name
            assert bool(np.asarray(other_label).reshape(())) == label, path.name
