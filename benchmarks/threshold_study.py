"""Choose the support-threshold rule by measurement: decisions at a grid of threshold positions.

For every (dataset, k, seed) cell of a few-shot benchmark config and every PatchCorePlus method in it,
the model builds its support data and support scores as in the benchmark, scores the cached test
features once, and then judges the thresholds of every (image position, pixel position) of the grid
(:func:`anomalib_protorefine.thresholds.choose_thresholds`) against the test labels and masks.
Printed: per position, per dataset, the balanced accuracy at the support threshold as a fraction of
the oracle's (the best threshold on the test set), averaged over k and seeds, its lowest (dataset, k)
cell, the pixel F1 as a fraction of the pixel F1-max, and the false-alarm and detection rates.

Run it on support seeds that the reported benchmark does not use:

    python benchmarks/threshold_study.py --config configs/benchmark/decision.yaml --seeds 5 6 7 8 9
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from anomalib_protorefine.benchmark.config import plan_from_config
from anomalib_protorefine.benchmark.decision import decision_values
from anomalib_protorefine.benchmark.job import RunContext
from anomalib_protorefine.benchmark.methods import build_patchcore, decisions, score_test_set
from anomalib_protorefine.benchmark.metrics import F1Max
from anomalib_protorefine.calibration import augment, pseudo_queries, split_transform
from anomalib_protorefine.few_shot import load_images
from anomalib_protorefine.thresholds import choose_thresholds

POSITIONS = (0.0, 0.1, 0.25, 0.5, 0.75)


def pixel_f1_max(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """The benchmark's pixel F1-max (anomalib's metric on whole-set-scaled maps)."""
    metric = F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_")
    metric.update(argparse.Namespace(anomaly_map=maps, gt_mask=masks))
    return float(metric.compute())


#: Bins of the pixel histograms in a cell record (pixel F1 at any threshold, to the bin width).
PIXEL_BINS = 4096


def copies_against_full_bank(model: object) -> dict[str, list[float]]:
    """Scores of two augmented copies of each support image (clean and with pasted defects) against the full bank.

    The other way to make pseudo-normal images: copies of bank members (optimistic), where the
    leave-one-out folds meet a bank of k - 1 images (pessimistic).
    """
    geometric, photometric = split_transform(model.pre_processor.transform)
    raw = load_images(model.support_paths, geometric)
    copies = torch.stack(
        [augment(image, model.few_shot_seed * 1000 + 500 + i * 2 + v) for i, image in enumerate(raw) for v in range(2)]
    )
    queries, masks = pseudo_queries(copies, model.few_shot_seed, 999, 3)
    with model.calibration_scoring():
        output = model.model(photometric(queries).to(model.device))
    scores, maps = output.pred_score.cpu(), output.anomaly_map.reshape(len(queries), *masks.shape[-2:]).cpu()
    defect = masks.flatten(1).any(1)
    return {
        "copy_normal_scores": scores[~defect].tolist(),
        "copy_defect_scores": scores[defect].tolist(),
        "copy_normal_pixel_max": [float(m.max()) for m in maps[~defect]],
        "copy_defect_pixel_quantiles": torch.quantile(
            maps[defect][masks[defect]].double(), torch.linspace(0, 1, 101, dtype=torch.float64)
        ).tolist(),
    }


def cell_record(dataset: str, k: int, seed: int, method: str, model: object, scored: object, test: object) -> dict:
    """What any threshold rule needs of a cell: pseudo scores, test scores and labels, pixel histograms."""
    support = model.support_scores
    quantiles = torch.linspace(0, 1, 101, dtype=torch.float64)
    low, high = float(scored.maps.min()), float(scored.maps.max())
    maps = scored.maps.double()
    masks = test.masks.bool()
    return {
        "dataset": dataset,
        "k": k,
        "seed": seed,
        "method": method,
        "normal_scores": support.normal_scores.tolist(),
        "defect_scores": support.defect_scores.tolist(),
        "normal_pixel_quantiles": torch.quantile(support.normal_pixels.double(), quantiles).tolist(),
        "defect_pixel_quantiles": torch.quantile(support.defect_pixels.double(), quantiles).tolist(),
        "test_scores": scored.scores.tolist(),
        "test_labels": test.labels.tolist(),
        "pixel_range": [low, high],
        "defect_pixel_histogram": torch.histc(maps[masks], PIXEL_BINS, low, high).long().tolist(),
        "normal_pixel_histogram": torch.histc(maps[~masks], PIXEL_BINS, low, high).long().tolist(),
        **copies_against_full_bank(model),
    }


def run(config: Path, seeds: list[int], out: Path, only: list[str] | None, dump_path: Path | None = None) -> list[dict]:
    """Score every cell once and judge every grid position; rows written to ``out`` (JSON lines).

    The test features are cached where the benchmark of ``config`` keeps them.
    """
    plan = plan_from_config(yaml.safe_load(config.read_text()))
    plan.seeds = seeds
    if only:
        plan.datasets = [data for data in plan.datasets if data.label in only]
    context = RunContext(plan)
    rows = []
    dump = dump_path.open("a") if dump_path is not None else None
    for data, k, seed in plan.cells:
        for method in plan.methods:
            test = context.test_features(data, method)
            datamodule = context.datamodule(data)
            model = build_patchcore(method, k, seed, context.device)
            model.prepare_support(datamodule)
            scored = score_test_set(model, method, test, context.device, 32)
            if dump is not None:
                dump.write(json.dumps(cell_record(data.label, k, seed, method.name, model, scored, test)) + "\n")
                dump.flush()
                print(f"{data.label} k={k} seed={seed} {method.name}: dumped", flush=True)
                continue
            f1_max = pixel_f1_max(scored.maps, test.masks)
            shared = decisions(model, scored, test)  # oracle, fallback (and the default positions)
            for image_position in POSITIONS:
                for pixel_position in POSITIONS:
                    thresholds = choose_thresholds(model.support_scores, image_position, pixel_position)
                    values = shared | decision_values(
                        scored.scores,
                        test.labels,
                        scored.maps,
                        test.masks,
                        thresholds.image_threshold,
                        thresholds.pixel_threshold,
                        "support_",
                    )
                    rows.append(
                        {
                            "dataset": data.label,
                            "k": k,
                            "seed": seed,
                            "method": method.name,
                            "image_position": image_position,
                            "pixel_position": pixel_position,
                            "pixel_F1Max": f1_max,
                            **values,
                        }
                    )
            print(f"{data.label} k={k} seed={seed} {method.name}: done", flush=True)
    with out.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return rows


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def table(rows: list[dict]) -> str:
    """Per (image position, pixel position) and dataset: the goal's ratios and the rates."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["image_position"], row["pixel_position"], row["dataset"])].append(row)
    lines = [
        "| image pos | pixel pos | dataset | BAcc / oracle | worst (k) cell | pixel F1 / F1-max | FAR | recall | "
        "fallback BAcc / oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (image_position, pixel_position, dataset), group in sorted(groups.items()):
        ratio = [r["support_image_BAcc"] / r["oracle_image_BAcc"] for r in group]
        by_k: dict[int, list[float]] = defaultdict(list)
        for r, value in zip(group, ratio, strict=True):
            by_k[r["k"]].append(value)
        worst = min(_mean(values) for values in by_k.values())
        pixel = [r.get("support_pixel_F1", float("nan")) / r["pixel_F1Max"] for r in group]
        fallback = [r["fallback_image_BAcc"] / r["oracle_image_BAcc"] for r in group]
        lines.append(
            f"| {image_position} | {pixel_position} | {dataset} | {_mean(ratio):.3f} | {worst:.3f} | "
            f"{_mean(pixel):.3f} | {_mean([r['support_image_FAR'] for r in group]):.3f} | "
            f"{_mean([r['support_image_Recall'] for r in group]):.3f} | {_mean(fallback):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/benchmark/decision.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    parser.add_argument("--out", type=Path, default=Path("results/threshold_study/rows.jsonl"))
    parser.add_argument("--only", nargs="+", default=None, help="only these datasets (labels)")
    parser.add_argument(
        "--dump", type=Path, default=None, help="write each cell's raw record (JSON lines) instead of the grid"
    )
    parser.add_argument("--table", nargs="*", type=Path, default=None, help="only print the table of these files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.table is not None:
        rows = [json.loads(line) for path in args.table or [args.out] for line in path.read_text().splitlines()]
    else:
        rows = run(args.config, args.seeds, args.out, args.only, args.dump)
    print(table(rows))


if __name__ == "__main__":
    main()
