"""Per-image inference time of PatchCorePlus vs PatchCore, measured in the same run.

Paper configuration: wide_resnet50_2 (random weights are fine for timing), layer2+layer3, 256 px,
k = 4 support images, coreset ratio 0.05, N = 10 EM iterations. The baseline is the same model
with ``refiner=None`` (plain nearest-neighbour PatchCore). Variants are interleaved round-robin
for ``--repeats`` rounds and the median per-image time is reported, plus a breakdown of one
refined batch (backbone, refinement, scoring, map).

Usage:
    python benchmarks/patchcore_speed.py                     # CPU, batch 8, 5 rounds
    python benchmarks/patchcore_speed.py --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner

VARIANTS: dict[str, dict[str, Any] | None] = {
    "PatchCore (baseline)": None,
    "PatchCorePlus closed form": {"m_step": "closed_form"},
    "PatchCorePlus gradient (paper)": {"m_step": "gradient"},
}


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Run the timing and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = PatchCorePlus(
        backbone=args.backbone,
        layers=tuple(args.layers),
        pre_trained=False,
        coreset_sampling_ratio=args.alpha,
        k_shot=args.k,
        refiner=False,
        visualizer=False,
        evaluator=False,
    ).to(device)
    size = (args.image_size, args.image_size)
    model.fit_support(torch.randn(args.k, 3, *size, device=device))
    model.eval()
    images = torch.randn(args.batch_size, 3, *size, device=device)
    refiners = {name: None if opts is None else PrototypeRefiner(**opts) for name, opts in VARIANTS.items()}

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with torch.inference_mode():
        for refiner in refiners.values():  # warm-up: allocations, bank factors, thread pools
            model.model.refiner = refiner
            model.model(images)
        for _ in range(args.repeats):
            for name, refiner in refiners.items():
                model.model.refiner = refiner
                _sync(device)
                start = time.perf_counter()
                model.model(images)
                _sync(device)
                times[name].append((time.perf_counter() - start) / args.batch_size)

        # Breakdown of one refined batch (closed form).
        model.model.refiner = refiners["PatchCorePlus closed form"]
        _sync(device)
        t0 = time.perf_counter()
        embedding, grid = model.model.embed(images)
        _sync(device)
        t1 = time.perf_counter()
        result = model.model.refiner.refine(embedding, model.model.memory_bank)
        _sync(device)
        t2 = time.perf_counter()
        scores = model.model.refiner.score_result(result)
        _sync(device)
        t3 = time.perf_counter()
        model.model.anomaly_map_generator(scores.reshape(-1, 1, *grid), size)
        _sync(device)
        t4 = time.perf_counter()
        model.model.refiner = None
        t5 = time.perf_counter()
        model.model.patch_scores(embedding)
        _sync(device)
        t6 = time.perf_counter()

    n_bank, channels = model.model.memory_bank.shape
    print(f"device={device} threads={torch.get_num_threads()} backbone={args.backbone} {args.layers} {size} px")
    print(f"k={args.k} alpha={args.alpha}: bank n={n_bank}, c={channels}, m={grid[0] * grid[1]} patches/image")
    print(f"batch={args.batch_size}, median of {args.repeats} interleaved rounds\n")
    base = statistics.median(times["PatchCore (baseline)"])
    print("| model | ms / image | ratio to PatchCore |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {median / base:.3f} |")
    per = 1000 / args.batch_size
    print("\nBreakdown of one closed-form batch (ms / image):")
    print("| backbone + embedding | refinement (EM) | scoring | map (bilinear + blur) | baseline NN scoring |")
    print("|---|---|---|---|---|")
    print(
        f"| {per * (t1 - t0):.1f} | {per * (t2 - t1):.1f} | {per * (t3 - t2):.1f} | {per * (t4 - t3):.1f} "
        f"| {per * (t6 - t5):.1f} |"
    )
    print(f"\nrefinement stats: {result.stats}")


if __name__ == "__main__":
    main()
