r"""Study of refinement forms against plain few-shot PatchCore on real data (does refinement pay?).

For every (dataset, k, seed) the support bank is built once (seeded draw, seeded coreset: the exact
bank ``PatchCorePlus`` builds), and every refiner configuration is run once per test batch; from
that one refinement several *scorings* are computed (Eq. 6 over all refined prototypes, the
patch's own prototype, fusions with the plain nearest-neighbour distance) and two image scores
(max, mean of the top 1 % patches). The baseline (plain nearest neighbour) is scored on the same
bank in the same run. Test embeddings are cached on disk, keyed by dataset, backbone, layers and
image size, so re-runs only pay for the scoring.

Results are appended as JSON lines (one per dataset, k, seed, config, scoring, aggregation), so a
crashed run resumes where it stopped; ``--table`` prints mean ± std over seeds from that file.

Usage:
    python scripts/refinement_study.py --datasets bsdata --k 1 2 4 --seeds 0 1 2 3 4 \\
        --configs paper local16 --out results/study/bsdata.jsonl
    python scripts/refinement_study.py --table results/study/bsdata.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812
from torchmetrics.classification import BinaryAUROC

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
from anomalib_protorefine.few_shot import support_from_dataset
from patchcore_accuracy import binned_pixel_metrics, f1_max, load_split

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "results" / "cache"

#: name -> PrototypeRefiner keyword arguments.
CONFIGS: dict[str, dict[str, Any]] = {
    "paper": {},
    "lam3": {"lambda_": 3.0},
    "w_only": {"transport": False},
}
for _k in (4, 8, 16, 32, 64):
    CONFIGS[f"local{_k}"] = {"neighbors": _k}
    CONFIGS[f"affine{_k}"] = {"neighbors": _k, "affine": True}
    for _lam in (0.1, 1.0, 3.0):
        CONFIGS[f"local{_k}_lam{_lam:g}"] = {"neighbors": _k, "lambda_": _lam}
        CONFIGS[f"affine{_k}_lam{_lam:g}"] = {"neighbors": _k, "affine": True, "lambda_": _lam}
    CONFIGS[f"affine{_k}_lam0"] = {"neighbors": _k, "affine": True, "transport": False}
    CONFIGS[f"local{_k}_lam0"] = {"neighbors": _k, "transport": False}

AGGREGATIONS = ("max", "top1")


def cached_split(model: PatchCorePlus, args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """Test embeddings, labels and masks of ``dataset`` (from the disk cache when present)."""
    key = json.dumps([dataset, args.backbone, args.layers, args.image_size, args.max_test, 1234])
    path = CACHE / f"{dataset}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        split = torch.load(path, weights_only=False)
    else:
        split = load_split(model, args.data_root / dataset, args.max_test, args.batch_size)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(split, path)
    return split


def image_scores(patch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image scores of patch scores ``(B, m)``: max, and the mean of the top 1 % patches."""
    top = max(1, math.ceil(0.01 * patch.shape[1]))
    return {"max": patch.amax(1), "top1": patch.topk(top, dim=1).values.mean(1)}


#: Scoring name -> (scoring_bank, score_fusion) applied to one refinement.
SCORING_OPTIONS = {
    "refined": ("refined", "none"),
    "matched": ("matched", "none"),
    "geo_refined": ("refined", "geometric"),
    "geo_matched": ("matched", "geometric"),
}


def scorings(model: PatchCorePlus, refiner: PrototypeRefiner | None, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
    """Patch scores ``(B, m)`` of one batch under every scoring (one refinement, scored by the product's code)."""
    if refiner is None:
        nn_scores = model.model.patch_scores(chunk)
        return {"nn": nn_scores, "nn_centred": _centred(nn_scores)}
    result = refiner.refine(chunk, model.model.memory_bank)
    options = refiner.options.as_dict()
    out = {
        name: PrototypeRefiner(**{**options, "scoring_bank": bank, "score_fusion": fusion}).score_result(result)
        for name, (bank, fusion) in SCORING_OPTIONS.items()
    }
    out["refined_centred"] = _centred(out["refined"])
    return out


def fast_maps(patch: torch.Tensor, split: dict[str, Any], model: PatchCorePlus, batch_size: int) -> torch.Tensor:
    """The model's anomaly maps ``(N, H, W)``: bilinear upsampling, then the Gaussian blur.

    The blur is applied as two 1-D convolutions: the Gaussian kernel is separable, so this equals the model's
    2-D convolution up to float rounding, 15x faster.
    """
    height, width = split["grid"]
    blur = model.model.anomaly_map_generator.blur
    kernel2d = blur.kernel[0, 0]
    row = kernel2d.sum(0)  # the 1-D Gaussian (the 2-D kernel is its outer product with itself)
    pad = blur.padding_shape
    maps = []
    for p in patch.split(batch_size):
        up = F.interpolate(p.reshape(-1, 1, height, width), size=split["image_size"], mode="bilinear")
        up = F.pad(up, pad, mode=blur.border_type)
        up = F.conv2d(up, row.reshape(1, 1, 1, -1))
        maps.append(F.conv2d(up, row.reshape(1, 1, -1, 1)).squeeze(1))
    return torch.cat(maps)


def _centred(patch: torch.Tensor) -> torch.Tensor:
    """Patch scores minus each image's median patch score (a per-image offset removed)."""
    return patch - patch.median(dim=1, keepdim=True).values


def metrics(
    patch: torch.Tensor, split: dict[str, Any], model: PatchCorePlus, batch_size: int
) -> dict[str, dict[str, float]]:
    """Image metrics for each aggregation and pixel metrics of the maps, from patch scores ``(N, m)``."""
    maps = fast_maps(patch, split, model, batch_size)
    lo, hi = maps.min(), maps.max()
    pixel_auroc, pixel_f1 = binned_pixel_metrics(
        ((maps - lo) / (hi - lo).clamp_min(1e-12)).flatten(), split["masks"].flatten()
    )
    labels = split["labels"]
    out = {}
    for name, pred in image_scores(patch).items():
        pred = (pred - pred.min()) / (pred.max() - pred.min()).clamp_min(1e-12)
        out[name] = {
            "image_auroc": float(BinaryAUROC()(pred, labels)),
            "image_f1max": f1_max(pred, labels),
            "pixel_auroc": pixel_auroc,
            "pixel_f1max": pixel_f1,
        }
    return out


def done_keys(path: Path) -> set[tuple]:
    """(dataset, k, seed, config) cells already in the results file."""
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        row = json.loads(line)
        keys.add((row["dataset"], row["k"], row["seed"], row["config"]))
    return keys


def run(args: argparse.Namespace) -> None:
    """Score every (dataset, k, seed, config) cell not yet in ``args.out``."""
    torch.set_num_threads(args.threads)
    model = make_model(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(args.out)
    configs = ["baseline", *args.configs]
    for dataset in args.datasets:
        start = time.perf_counter()
        split = cached_split(model, args, dataset)
        print(f"[{dataset}] {len(split['labels'])} test images ready in {time.perf_counter() - start:.0f}s", flush=True)
        for k in args.k:
            for seed in args.seeds:
                todo = [c for c in configs if (dataset, k, seed, c) not in done]
                if not todo:
                    continue
                model.few_shot_seed = seed
                support = support_from_dataset(split["train"], k, seed, model.pre_processor.transform)
                model.fit_support(support.images)
                n_bank = model.model.memory_bank.shape[0]
                for config in todo:
                    refiner = None if config == "baseline" else PrototypeRefiner(**CONFIGS[config])
                    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
                    tic = time.perf_counter()
                    with torch.inference_mode():
                        for chunk in split["embeddings"].split(args.batch_size):
                            for name, value in scorings(model, refiner, chunk).items():
                                parts[name].append(value)
                    seconds = time.perf_counter() - tic
                    rows = []
                    for scoring, values in parts.items():
                        for agg, values_m in metrics(torch.cat(values), split, model, args.batch_size).items():
                            rows.append(
                                {
                                    "dataset": dataset,
                                    "k": k,
                                    "seed": seed,
                                    "config": config,
                                    "scoring": scoring,
                                    "agg": agg,
                                    "n_bank": n_bank,
                                    "ms_per_image": 1000 * seconds / len(split["labels"]),
                                    **values_m,
                                }
                            )
                    with args.out.open("a") as handle:
                        handle.write("".join(json.dumps(r) + "\n" for r in rows))
                    best = max(rows, key=lambda r: r["pixel_auroc"] + r["image_auroc"])
                    print(
                        f"  {dataset} k={k} seed={seed} {config:>16} {seconds:6.1f}s  best {best['scoring']}/"
                        f"{best['agg']}: img {best['image_auroc']:.3f} px {best['pixel_auroc']:.3f}",
                        flush=True,
                    )


def table(paths: list[Path], baseline: str = "baseline/nn/max") -> None:
    """Print mean ± std over seeds per (dataset, k, method), and the gain over ``baseline`` on the same seeds."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        cells[(r["dataset"], r["k"], f"{r['config']}/{r['scoring']}/{r['agg']}")][r["seed"]] = r
    methods = sorted({m for (_, _, m) in cells})
    groups = sorted({(d, k) for (d, k, _) in cells})
    summary: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    print("| dataset | k | method | seeds | image AUROC | Δ | pixel AUROC | Δ | pixel F1-max | Δ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset, k in groups:
        base = cells.get((dataset, k, baseline), {})
        for method in methods:
            runs = cells.get((dataset, k, method))
            if not runs:
                continue
            seeds = sorted(set(runs) & set(base)) if method != baseline else sorted(runs)
            if not seeds:
                continue
            line = [dataset, str(k), method, str(len(seeds))]
            gains = []
            for metric in ("image_auroc", "pixel_auroc", "pixel_f1max"):
                values = [runs[s][metric] for s in seeds]
                diffs = [runs[s][metric] - base[s][metric] for s in seeds]
                line += [_fmt(values), f"{100 * sum(diffs) / len(diffs):+.1f}"]
                gains.append(100 * sum(diffs) / len(diffs))
            summary[method].append((gains[0], gains[1], gains[2]))
            print("| " + " | ".join(line) + " |")
    print(
        "\n| method | cells | mean Δ image AUROC | mean Δ pixel AUROC | mean Δ pixel F1-max | worst Δ image | "
        "worst Δ pixel |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, gains in sorted(summary.items(), key=lambda kv: -sum(g[0] + g[1] for g in kv[1]) / len(kv[1])):
        img, pix, f1 = ([g[i] for g in gains] for i in range(3))
        print(
            f"| {method} | {len(gains)} | {sum(img) / len(img):+.2f} | {sum(pix) / len(pix):+.2f} | "
            f"{sum(f1) / len(f1):+.2f} | {min(img):+.1f} | {min(pix):+.1f} |"
        )


def _fmt(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Backbone, data and run options shared with ``calibration_study.py``."""
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=DATA)


def make_model(args: argparse.Namespace) -> PatchCorePlus:
    """The PatchCorePlus whose backbone, pre-processor, bank building and scoring the studies use."""
    return PatchCorePlus(
        backbone=args.backbone,
        layers=tuple(args.layers),
        coreset_sampling_ratio=args.alpha,
        k_shot=1,
        refiner=False,
        visualizer=False,
        evaluator=False,
        pre_processor=PatchCorePlus.configure_pre_processor((args.image_size, args.image_size), args.backbone),
    ).eval()


def main() -> None:
    """Parse arguments; run the study or print its table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["bsdata"])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--configs", nargs="+", default=["paper", "affine16"])
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "study" / "study.jsonl")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="print the table of these result files")
    parser.add_argument("--baseline", default="baseline/nn/max")
    args = parser.parse_args()
    if args.table:
        table(args.table, args.baseline)
        return
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    run(args)


if __name__ == "__main__":
    main()
