"""Per-image inference time and peak memory of PatchCorePlus vs PatchCore, measured in the same run.

Paper configuration: wide_resnet50_2 (random weights are fine for timing), layer2+layer3, 256 px,
k = 4 support images, coreset ratio 0.05, N = 10 EM iterations. The baseline is the same model
with ``refiner=None`` (plain nearest-neighbour PatchCore). The refined variants cover lambda 0.3
(paper) and 3 with both M-steps; ``--solvers auto pot`` adds the same variants with POT's
per-query Sinkhorn (``sinkhorn_method="sinkhorn"``, the solver used before the batched one; closed
form only) and
``--em-tol`` adds closed-form variants with that early stop. Variants are interleaved round-robin
for ``--repeats`` rounds and the median per-image time is reported, with the refinement
statistics and a breakdown of one refined batch (backbone, refinement, scoring).

Then (unless ``--no-memory``) it measures the peak memory of the refinement and of the scoring of
one image at m = 1024, 4096, 16384 patches (n = 204, c = 1536), each size in a fresh subprocess,
with the benchmark's :func:`~anomalib_protorefine.benchmark.resources.peak_memory` (on CPU the growth
of the resident set's high-water mark, on GPU ``torch.cuda.max_memory_allocated``).

Usage:
    python scripts/patchcore_speed.py --threads 2 --repeats 3
    python scripts/patchcore_speed.py --threads 1 --clock process --solvers auto pot --em-tol 1e-3
    python scripts/patchcore_speed.py --device cuda --batch-size 32 --solvers auto
    python scripts/patchcore_speed.py --threads 1 --clock process --repeats 3 --no-memory \
        --iterations 1 2 3 5 --images ../shared/data/bsdata/test/good
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
from anomalib_protorefine.benchmark.resources import peak_memory
from anomalib_protorefine.few_shot import folder_images, load_images
from anomalib_protorefine.models.patchcore_plus.lightning_model import PATCHCORE_LOCAL_REFINER

BASELINE = "PatchCore (baseline)"


def variants(
    solvers: list[str], em_tol: float | None, iterations: list[int] | None = None
) -> dict[str, dict[str, Any] | None]:
    """Name -> refiner options (``None``: the baseline)."""
    table: dict[str, dict[str, Any] | None] = {BASELINE: None}
    # PatchCorePlus's default form: the paper's EM (lambda 0.3, closed form) with geometric score fusion.
    table["default (fused): lambda 0.3, closed form, auto"] = {"lambda_": 0.3, "score_fusion": "geometric"}
    # The local preset (refiner="local"): 16 neighbours, no transport term, own refined prototype, fused.
    table["local: 16 neighbours, no transport"] = dict(PATCHCORE_LOCAL_REFINER)
    for count in iterations or ():
        table[f"fused, N {count}"] = {"lambda_": 0.3, "score_fusion": "geometric", "num_iterations": count}
    for solver in solvers:
        method = "auto" if solver == "auto" else "sinkhorn"
        for lambda_ in (0.3, 3.0):
            # POT's per-query solver (the previous E-step) is timed with the closed form only.
            for m_step in ("closed_form", "gradient") if solver == "auto" else ("closed_form",):
                name = f"lambda {lambda_:g}, {m_step.replace('_', ' ')}, {solver}"
                table[name] = {"lambda_": lambda_, "m_step": m_step, "sinkhorn_method": method}
            if em_tol is not None and solver == "auto":
                name = f"lambda {lambda_:g}, closed form, {solver}, em_tol {em_tol:g}"
                table[name] = {"lambda_": lambda_, "em_tol": em_tol}
    return table


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_child(patches: int, device: str, bank_size: int, channels: int) -> None:
    """Peak memory (MB) of refining, then of scoring, one query of ``patches`` patches; prints JSON."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(device)
    queries = torch.randn(1, patches, channels, device=dev)
    bank = torch.randn(bank_size, channels, device=dev)
    refiner = PrototypeRefiner()
    refiner.bank_factors(bank)  # per-bank factors are not per-image memory
    refined: dict[str, float] = {}
    scored: dict[str, float] = {}
    start = time.perf_counter()
    with peak_memory(dev, refined):
        result = refiner.refine(queries, bank)
    with peak_memory(dev, scored):  # with the refinement's result still held
        scores = refiner.score_result(result)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "refine_mb": refined["peak_mb"],
                "score_mb": scored["peak_mb"],
                "seconds": seconds,
                "finite": bool(torch.isfinite(scores).all()),
            }
        )
    )


def memory_table(args: argparse.Namespace) -> None:
    """Run :func:`memory_child` in a fresh subprocess per size and print the table."""
    print("\nPeak memory of refinement and of scoring, one image (closed form, lambda 0.3), n=204, c=1536:")
    print("| m (patches) | peak of refinement (MB) | peak of scoring (MB) | seconds |")
    print("|---|---|---|---|")
    for patches in args.memory_sizes:
        command = [sys.executable, __file__, "--memory-child", str(patches), "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"| {patches} | failed: {reason[:80]} | | |")
            continue
        result = json.loads(lines[-1])
        print(f"| {patches} | {result['refine_mb']:.0f} | {result['score_mb']:.0f} | {result['seconds']:.2f} |")


def main() -> None:
    """Run the timing (and the memory table) and print the tables."""
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
    parser.add_argument("--solvers", nargs="+", default=["auto"], choices=["auto", "pot"])
    parser.add_argument("--em-tol", type=float, default=None, help="also time closed-form variants with this em_tol")
    parser.add_argument("--iterations", nargs="+", type=int, default=None, help="also time the fused form at these N")
    parser.add_argument(
        "--images", type=Path, default=None, help="folder of real images: k support + batch queries (default: noise)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table (subprocesses)")
    parser.add_argument("--memory-sizes", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--skip-timing", action="store_true", help="only the memory table")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall-clock time, or CPU time of this process (all threads; robust on a shared machine)",
    )
    parser.add_argument("--json", type=Path, default=None, help="append the timing medians to this JSON-lines file")
    parser.add_argument("--memory-child", type=int, metavar="M", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.device, 204, 1536)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_timing:
        timing(args)
    if not args.no_memory or args.skip_timing:
        memory_table(args)


def timing(args: argparse.Namespace) -> None:
    """Interleaved timing of the baseline and the refined variants."""
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
    if args.images is not None:
        files = folder_images(args.images)
        if len(files) < args.k + args.batch_size:
            msg = f"--images {args.images} holds {len(files)} images; need k + batch-size = {args.k + args.batch_size}."
            raise SystemExit(msg)
        transform = PatchCorePlus.configure_pre_processor(image_size=size, backbone=args.backbone).transform
        real = load_images(files[: args.k + args.batch_size], transform).to(device)
        support, images = real[: args.k], real[args.k :]
    else:
        support = torch.randn(args.k, 3, *size, device=device)
        images = torch.randn(args.batch_size, 3, *size, device=device)
    model.fit_support(support)
    model.eval()
    table = variants(args.solvers, args.em_tol, args.iterations)
    refiners = {name: None if opts is None else PrototypeRefiner(**opts) for name, opts in table.items()}

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in table}
    stats: dict[str, list[dict[str, float]]] = {name: [] for name in table}
    with torch.inference_mode():
        for refiner in refiners.values():  # warm-up: allocations, bank factors, thread pools
            model.model.refiner = refiner
            model.model(images)
        for _ in range(args.repeats):
            for name, refiner in refiners.items():
                model.model.refiner = refiner
                _sync(device)
                start = clock()
                model.model(images)
                _sync(device)
                times[name].append((clock() - start) / args.batch_size)
                if refiner is not None:
                    stats[name].append(dict(refiner.last_stats))

        # Breakdown of one refined batch per refined variant.
        embedding, grid = model.model.embed(images)
        breakdown: dict[str, tuple[float, float]] = {}
        for name, refiner in refiners.items():
            if refiner is None:
                continue
            _sync(device)
            t0 = clock()
            result = refiner.refine(embedding, model.model.memory_bank)
            _sync(device)
            t1 = clock()
            refiner.score_result(result)
            _sync(device)
            breakdown[name] = (t1 - t0, clock() - t1)
        model.model.refiner = None
        _sync(device)
        t0 = clock()
        model.model.embed(images)
        _sync(device)
        t1 = clock()
        model.model.patch_scores(embedding)
        _sync(device)
        t2 = clock()

    n_bank, channels = model.model.memory_bank.shape
    print(f"device={device} threads={torch.get_num_threads()} backbone={args.backbone} {args.layers} {size} px")
    print(f"k={args.k} alpha={args.alpha}: bank n={n_bank}, c={channels}, m={grid[0] * grid[1]} patches/image")
    print(f"batch={args.batch_size}, median of {args.repeats} interleaved rounds, {args.clock} clock\n")
    base = statistics.median(times[BASELINE])
    per = 1000 / args.batch_size
    print("| variant | ms / image | ratio to PatchCore | EM iterations | Sinkhorn iterations / image |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        em = sinkhorn = "-"
        if stats[name]:
            em = f"{statistics.median(s['em_iterations'] for s in stats[name]):.1f}"
            sinkhorn = f"{statistics.median(s['sinkhorn_iterations'] for s in stats[name]):.0f}"
        print(f"| {name} | {1000 * median:.1f} | {median / base:.3f} | {em} | {sinkhorn} |")
    if args.json:
        record = {
            "batch": args.batch_size,
            "device": str(device),
            "ms_per_image": {name: 1000 * statistics.median(values) for name, values in times.items()},
        }
        with args.json.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    print(f"\nBreakdown of one batch (ms / image): backbone + embedding {per * (t1 - t0):.1f}, baseline NN scoring")
    print(f"{per * (t2 - t1):.1f}; per refined variant:\n")
    print("| variant | refinement (EM) | scoring |")
    print("|---|---|---|")
    for name, (refine_s, score_s) in breakdown.items():
        print(f"| {name} | {per * refine_s:.1f} | {per * score_s:.1f} |")


if __name__ == "__main__":
    main()
