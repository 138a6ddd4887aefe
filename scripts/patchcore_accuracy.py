"""Accuracy of few-shot PatchCore vs PatchCorePlus variants on real data (BSData, DeepPCB).

Every variant is scored with the *same* code path as the model (``PatchCorePlusModel.patch_scores``,
image score = max, bilinear map + Gaussian sigma 4) on the *same* seeded support draws: test
features are extracted once per dataset, support banks once per (k, seed), then each variant
only re-scores. Prints a table of mean +- std over seeds per (dataset, k, variant).

Pixel metrics use 1000 bins on maps min-max normalised over the whole test set (exact to
~1e-3); image metrics are exact (torchmetrics).

Usage:
    python scripts/patchcore_accuracy.py                       # core variants, k=1,2,4, seeds 0-2
    python scripts/patchcore_accuracy.py --variants closed eps0.01 eps0.2 matched union --k 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Folder
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC, BinaryPrecisionRecallCurve

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
from anomalib_protorefine.few_shot import support_from_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

#: name -> refiner keyword arguments (None: plain PatchCore baseline).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "closed": {},
    "gradient": {"m_step": "gradient"},
    "w_only": {"transport": False},
    "eps0.01": {"epsilon": 0.01},
    "eps0.2": {"epsilon": 0.2},
    "eps1": {"epsilon": 1.0},
    "matched": {"scoring_bank": "matched"},
    "union": {"scoring_bank": "union"},
    "costmax": {"cost_normalization": "max"},
    "lam1": {"lambda_": 1.0},
    "lam3": {"lambda_": 3.0},
    "lam0.1": {"lambda_": 0.1},
    "lam10": {"lambda_": 10.0},
    "lam3eps0.01": {"lambda_": 3.0, "epsilon": 0.01},
    "lam3union": {"lambda_": 3.0, "scoring_bank": "union"},
    "lam3matched": {"lambda_": 3.0, "scoring_bank": "matched"},
    "lam3grad": {"lambda_": 3.0, "m_step": "gradient"},
    "emtol": {"em_tol": 1e-3},
    "online": {"__online__": True},
}


def f1_max(preds: torch.Tensor, target: torch.Tensor) -> float:
    """Maximum F1 over all thresholds (exact, torchmetrics)."""
    precision, recall, _ = BinaryPrecisionRecallCurve()(preds, target)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float(f1.max())


def binned_pixel_metrics(scores: torch.Tensor, target: torch.Tensor, bins: int = 1000) -> tuple[float, float]:
    """Pixel AUROC and F1-max from score histograms of [0, 1]-normalised maps (``bins`` thresholds).

    torchmetrics' binned curves loop over thresholds for inputs this large (30M+ pixels), which
    takes minutes; two ``bincount`` calls give the same binned ROC/PR curves in well under a second.
    """
    index = (scores.clamp(0, 1) * bins).long().clamp_max(bins - 1)
    positives = torch.bincount(index[target], minlength=bins).double().flip(0).cumsum(0)
    negatives = torch.bincount(index[~target], minlength=bins).double().flip(0).cumsum(0)
    tpr = torch.cat((torch.zeros(1, dtype=torch.float64), positives / positives[-1]))
    fpr = torch.cat((torch.zeros(1, dtype=torch.float64), negatives / negatives[-1]))
    auroc = float(torch.trapezoid(tpr, fpr))
    precision = positives / (positives + negatives).clamp_min(1)
    recall = positives / positives[-1]
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return auroc, float(f1.max())


def load_split(model: PatchCorePlus, dataset_root: Path, max_test: int | None, batch_size: int) -> dict[str, Any]:
    """Extract test embeddings (once), labels and resized masks of a Folder dataset."""
    datamodule = Folder(
        name=dataset_root.name,
        root=dataset_root,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        mask_dir="ground_truth/defect",
        val_split_mode="none",
        eval_batch_size=batch_size,
        num_workers=0,
    )
    datamodule.setup()
    test = datamodule.test_data
    indices = list(range(len(test)))
    if max_test is not None and max_test < len(indices):
        generator = torch.Generator().manual_seed(1234)
        indices = sorted(torch.randperm(len(indices), generator=generator)[:max_test].tolist())
    subset = torch.utils.data.Subset(test, indices)
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=test.collate_fn)
    embeddings, labels, masks = [], [], []
    transform = model.pre_processor.transform
    with torch.no_grad():
        for batch in loader:
            images, gt_masks = transform(batch.image, batch.gt_mask)
            embedding, grid = model.model.embed(images)
            embeddings.append(embedding)
            labels.append(batch.gt_label.int())
            masks.append(gt_masks.bool().reshape(len(images), *images.shape[-2:]))
    return {
        "train": datamodule.train_data,
        "embeddings": torch.cat(embeddings),
        "labels": torch.cat(labels),
        "masks": torch.cat(masks),
        "grid": grid,
        "image_size": tuple(images.shape[-2:]),
    }


def evaluate(model: PatchCorePlus, split: dict[str, Any], batch_size: int) -> dict[str, float]:
    """Score cached embeddings with the model's current refiner/bank and compute the metrics."""
    scores, maps, seconds = [], [], 0.0
    height, width = split["grid"]
    with torch.inference_mode():
        for chunk in split["embeddings"].split(batch_size):
            start = time.perf_counter()
            patch = model.model.patch_scores(chunk)
            seconds += time.perf_counter() - start
            scores.append(patch.amax(1))
            maps.append(model.model.anomaly_map_generator(patch.reshape(-1, 1, height, width), split["image_size"]))
    pred = torch.cat(scores)
    amap = torch.cat(maps).squeeze(1)
    labels, masks = split["labels"], split["masks"]
    lo, hi = amap.min(), amap.max()
    pixel_auroc, pixel_f1 = binned_pixel_metrics(((amap - lo) / (hi - lo).clamp_min(1e-12)).flatten(), masks.flatten())
    # torchmetrics applies a sigmoid to scores outside [0, 1] (all distances > 30 would tie at 1.0):
    # min-max normalise first, which changes neither AUROC nor F1-max.
    pred = (pred - pred.min()) / (pred.max() - pred.min()).clamp_min(1e-12)
    return {
        "image_auroc": float(BinaryAUROC()(pred, labels)),
        "image_f1max": f1_max(pred, labels),
        "pixel_auroc": pixel_auroc,
        "pixel_f1max": pixel_f1,
        "ms_per_image": 1000 * seconds / len(pred),
    }


def make_model(args: argparse.Namespace) -> PatchCorePlus:
    """A PatchCorePlus used for its backbone, pre-processor, bank building and scoring."""
    return PatchCorePlus(
        backbone=args.backbone,
        layers=tuple(args.layers),
        pre_trained=True,
        coreset_sampling_ratio=args.alpha,
        k_shot=1,
        refiner=False,
        visualizer=False,
        evaluator=False,
    ).eval()


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["bsdata", "deeppcb"])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["baseline", "closed", "gradient", "w_only"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--max-test", type=int, default=None, help="random subset of the test set (seeded)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None, help="also write all raw results here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 is fastest for these small ops on a shared CPU"
    )
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    for name in args.datasets:
        if not (args.data_root / name).is_dir():
            parser.error(f"dataset folder {args.data_root / name} not found (see ../shared/data/README.md)")

    torch.set_num_threads(args.threads)
    model = make_model(args)
    rows: dict[tuple[str, int, str], list[dict[str, float]]] = defaultdict(list)
    for dataset in args.datasets:
        start = time.perf_counter()
        split = load_split(model, args.data_root / dataset, args.max_test, args.batch_size)
        elapsed = time.perf_counter() - start
        print(f"[{dataset}] {len(split['labels'])} test images embedded in {elapsed:.0f}s", flush=True)
        for k in args.k:
            for seed in args.seeds:
                model.few_shot_seed = seed
                support = support_from_dataset(split["train"], k, seed, model.pre_processor.transform)
                model.fit_support(support.images)
                for variant in args.variants:
                    options = dict(VARIANTS[variant] or {})
                    online = bool(options.pop("__online__", False))
                    model.model.refiner = None if VARIANTS[variant] is None else PrototypeRefiner(**options)
                    model.model.online = online
                    model.model.online_bank = torch.empty(0)
                    metrics = evaluate(model, split, args.batch_size)
                    rows[(dataset, k, variant)].append(metrics)
                    print(f"  {dataset} k={k} seed={seed} {variant:>9}: " + json.dumps(metrics), flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"|".join(map(str, key)): value for key, value in rows.items()}, indent=1))


def _mean_std(values: list[float]) -> str:
    """Format mean +- sample std (std 0 for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f} ± {100 * std:3.1f}"


def print_table(rows: dict[tuple[str, int, str], list[dict[str, float]]]) -> None:
    """Print a markdown table of mean +- std over seeds."""
    header = (
        "| dataset | k | variant | image AUROC | pixel AUROC | image F1-max | pixel F1-max | ms/img (scoring) | seeds |"
    )
    print("\n" + header)
    print("|---|---|---|---|---|---|---|---|---|")
    for (dataset, k, variant), runs in rows.items():
        cells = [_mean_std([r[m] for r in runs]) for m in ("image_auroc", "pixel_auroc", "image_f1max", "pixel_f1max")]
        ms = sum(r["ms_per_image"] for r in runs) / len(runs)
        print(f"| {dataset} | {k} | {variant} | " + " | ".join(cells) + f" | {ms:.1f} | {len(runs)} |")


if __name__ == "__main__":
    main()
