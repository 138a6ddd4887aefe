"""Do scores computed on ``--device`` agree with the same scores computed on the CPU?

For PatchCorePlus (paper configuration, random WRN-50 weights, lambda 0.3 and 3, both M-steps)
the query embeddings and the memory bank are computed once on the CPU and copied to the device,
so only the refinement and the scoring are compared. For WinClipPlus (the tiny test CLIP of
``models/winclip_plus/tiny_clip.py``, or ``ViT-B-16-plus-240`` with ``--winclip-arch real``; random weights)
the whole model runs on each device from the same weights and references. Prints one table with
the largest relative difference of the patch/pixel scores and of the image scores, and exits
with status 1 when a difference exceeds ``--tolerance``.

Sinkhorn stops at a relative marginal violation of ``sinkhorn_tol`` (1e-3), and float32 matrix
products differ between devices, so the plans (hence the scores) agree to about that tolerance,
not bitwise.

Usage:
    python scripts/gpu_check.py --device cuda
    python scripts/gpu_check.py --device cpu --small      # smoke test of this script, no GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner

ROOT = Path(__file__).resolve().parents[1]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def patchcore_rows(device: torch.device, small: bool, batch: int) -> list[tuple[str, float, float]]:
    """(name, patch-score difference, image-score difference) per refiner variant."""
    torch.manual_seed(0)
    backbone, layers, size = ("resnet18", ("layer2",), 64) if small else ("wide_resnet50_2", ("layer2", "layer3"), 256)
    model = PatchCorePlus(
        backbone=backbone,
        layers=layers,
        pre_trained=False,
        coreset_sampling_ratio=0.05,
        k_shot=4,
        refiner=False,
        visualizer=False,
        evaluator=False,
    ).eval()
    model.fit_support(torch.randn(4, 3, size, size))
    with torch.inference_mode():
        embedding, _ = model.model.embed(torch.randn(batch, 3, size, size))
    bank = model.model.memory_bank
    rows = []
    for lambda_ in (0.3, 3.0):
        for m_step in ("closed_form", "gradient"):
            options = {"lambda_": lambda_, "m_step": m_step}
            with torch.inference_mode():
                cpu = PrototypeRefiner(**options).patch_scores(embedding, bank)
                dev = PrototypeRefiner(**options).patch_scores(embedding.to(device), bank.to(device))
            rows.append(
                (f"PatchCorePlus lambda {lambda_:g} {m_step}", _relative(dev, cpu), _relative(dev.amax(1), cpu.amax(1)))
            )
    with torch.inference_mode():
        baseline_cpu = model.model.patch_scores(embedding)
        model.model.to(device)
        baseline_dev = model.model.patch_scores(embedding.to(device))
    rows.append(
        (
            "PatchCore baseline",
            _relative(baseline_dev, baseline_cpu),
            _relative(baseline_dev.amax(1), baseline_cpu.amax(1)),
        )
    )
    return rows


def winclip_rows(device: torch.device, arch: str, batch: int) -> list[tuple[str, float, float]]:
    """WinClipPlus (refined) and plain WinCLIP on CPU vs ``device``."""
    from anomalib_protorefine.models.winclip_plus import tiny_clip
    from anomalib_protorefine.models.winclip_plus.lightning_model import WINCLIP_REFINER_DEFAULTS
    from anomalib_protorefine.models.winclip_plus.torch_model import WinClipPlusModel

    backbone = str(tiny_clip.write_config(Path(tempfile.mkdtemp()))) if arch == "tiny" else "ViT-B-16-plus-240"
    torch.manual_seed(0)
    references = torch.randn(2, 3, 240, 240)
    queries = torch.randn(batch, 3, 240, 240)
    rows = []
    for name, refiner in (("WinClipPlus refined", True), ("WinCLIP plain", False)):
        torch.manual_seed(0)
        cpu_model = WinClipPlusModel(
            backbone=backbone,
            pretrained=None,
            refiner=PrototypeRefiner(**WINCLIP_REFINER_DEFAULTS) if refiner else None,
            coreset_sampling_ratio=0.5,
        ).eval()
        cpu_model.setup("object", references)
        with torch.inference_mode():
            cpu = cpu_model(queries)
            cpu_model.to(device)
            dev = cpu_model(queries.to(device))
        rows.append(
            (f"{name} ({arch})", _relative(dev.anomaly_map, cpu.anomaly_map), _relative(dev.pred_score, cpu.pred_score))
        )
    return rows


def main() -> None:
    """Compare and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--winclip-arch", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--small", action="store_true", help="resnet18 at 64 px instead of the paper's WRN-50")
    parser.add_argument("--tolerance", type=float, default=1e-2, help="largest accepted relative difference")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = patchcore_rows(device, args.small, args.batch_size) + winclip_rows(
        device, args.winclip_arch, args.batch_size
    )
    print(f"\nScores on {device} vs CPU (largest difference relative to the largest CPU score):")
    print("| model | patch / pixel scores | image scores | agree |")
    print("|---|---|---|---|")
    ok = True
    for name, patch, image in rows:
        agree = patch <= args.tolerance and image <= args.tolerance
        ok &= agree
        print(f"| {name} | {patch:.2e} | {image:.2e} | {'yes' if agree else 'NO'} |")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
