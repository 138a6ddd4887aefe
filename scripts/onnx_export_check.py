"""ONNX export of PatchCorePlus on real images: ONNX Runtime (and OpenVINO) against the torch model.

Builds the default PatchCorePlus (EfficientNet-Lite0, offline weights) on k support images of a
data set under ``../shared/data``, exports it with ``model.to_onnx`` (fixed Sinkhorn iterations,
see the README's "Predict and export"), runs the same raw test images through ONNX Runtime, the
torch model with the exported fixed-iteration E-step, the torch model with its default solver and
(if installed) OpenVINO in float32 (its antialiased resize differs on images not already at the
model's input size, see the README), and prints the largest differences relative to the largest
value, and the time per image (one thread).

Usage:
    python scripts/onnx_export_check.py                       # BSData, k = 2, 8 test images
    python scripts/onnx_export_check.py --dataset deeppcb --k 4 --images 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
from anomalib_protorefine.few_shot import load_images
from anomalib_protorefine.refinement.refiner import EXPORT_SINKHORN_ITERATIONS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUTPUTS = ("pred_score", "anomaly_map")


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the largest absolute value of ``b``."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    """Export, run every backend on the same images and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="bsdata")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="test images (half defective, half good)")
    parser.add_argument("--data-root", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    root = args.data_root / args.dataset
    model = PatchCorePlus(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), k_shot=args.k).eval()
    support = sorted((root / "train" / "good").iterdir())[: args.k]
    model.fit_support(load_images([str(p) for p in support], model.pre_processor.transform))
    half = args.images // 2
    tests = (
        sorted((root / "test" / "defect").iterdir())[::40][:half]
        + sorted((root / "test" / "good").iterdir())[::40][:half]
    )
    raw = load_images([str(p) for p in tests], None)
    with tempfile.TemporaryDirectory() as folder:
        tic = time.perf_counter()
        path = model.to_onnx(folder, input_size=None)
        print(f"export: {time.perf_counter() - tic:.0f} s")
        results: dict[str, dict[str, np.ndarray]] = {}
        seconds: dict[str, float] = {}
        with torch.no_grad():
            tic = time.perf_counter()
            out = model(raw)
            seconds["torch, default solver"] = time.perf_counter() - tic
            results["torch, default solver"] = {name: getattr(out, name).numpy() for name in OUTPUTS}
            options = model.model.refiner.options.as_dict()
            model.model.refiner = PrototypeRefiner(
                **{**options, "sinkhorn_method": "fixed", "sinkhorn_max_iter": EXPORT_SINKHORN_ITERATIONS}
            )
            tic = time.perf_counter()
            out = model(raw)
            seconds["torch, fixed iterations"] = time.perf_counter() - tic
            results["torch, fixed iterations"] = {name: getattr(out, name).numpy() for name in OUTPUTS}
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        tic = time.perf_counter()
        results["ONNX Runtime"] = dict(zip(names, session.run(None, {"input": raw.numpy()}), strict=True))
        seconds["ONNX Runtime"] = time.perf_counter() - tic
        try:
            import openvino as ov

            compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            tic = time.perf_counter()
            outputs = compiled(raw.numpy())
            seconds["OpenVINO (f32)"] = time.perf_counter() - tic
            results["OpenVINO (f32)"] = {key.get_any_name(): value for key, value in outputs.items()}
        except ImportError:
            print("openvino not installed: skipped")
    reference = results["torch, fixed iterations"]
    default = results["torch, default solver"]
    print(f"\n{args.dataset}, k = {args.k}, {len(tests)} images of {tuple(raw.shape[-2:])} px, one thread")
    print("| backend | s / image | scores vs torch fixed | maps vs torch fixed | scores vs default | maps vs default |")
    print("|---|---|---|---|---|---|")
    for name, values in results.items():
        cells = [relative(values[o], reference[o]) for o in OUTPUTS] + [
            relative(values[o], default[o]) for o in OUTPUTS
        ]
        print(f"| {name} | {seconds[name] / len(tests):.2f} | " + " | ".join(f"{c:.1e}" for c in cells) + " |")


if __name__ == "__main__":
    main()
