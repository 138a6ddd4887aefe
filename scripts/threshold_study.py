"""Choose the support-threshold rule by measurement (the study behind ``anomalib_protorefine.thresholds``).

Two steps. ``--dump`` scores every (dataset, k, seed) cell of a few-shot benchmark config for every
PatchCorePlus method in it, as the benchmark does, and writes one raw record per cell: the
pseudo-normal and pseudo-defect scores of both constructions (augmented copies against the full
bank: the model's own; leave-one-out folds), the test image scores and labels, and histograms of
the test maps' pixel values inside and outside the defect masks (pixel F1 at any threshold, to the
bin width). ``--analyse`` then judges every rule (construction x position, pixel threshold = image
threshold or a pixel gap) against the test labels: per data set and method, the balanced accuracy
at the rule's threshold as a fraction of the oracle's (the best threshold on the test set) averaged
over k and seeds, its lowest k, the pixel F1 as a fraction of the pixel F1-max, and the false-alarm
rate per k. Run it on support seeds that the reported benchmark does not use:

    python scripts/threshold_study.py --only bsdata --dump results/threshold_study/dump_bsdata.jsonl
    python scripts/threshold_study.py --only deeppcb --dump results/threshold_study/dump_deeppcb.jsonl
    python scripts/threshold_study.py --analyse results/threshold_study/dump_*.jsonl

(``--seeds`` defaults to 5-9; the reported benchmark, configs/benchmark/decision.yaml, uses 0-4.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

from anomalib_protorefine.benchmark.config import plan_from_config
from anomalib_protorefine.benchmark.job import RunContext
from anomalib_protorefine.benchmark.methods import build_patchcore, score_test_set
from anomalib_protorefine.calibration import split_transform
from anomalib_protorefine.few_shot import load_images
from anomalib_protorefine.thresholds import collect_support_scores

#: Bins of the pixel histograms in a cell record.
PIXEL_BINS = 4096
#: Positions judged by ``--analyse``.
POSITIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
QUANTILES = torch.linspace(0, 1, 101, dtype=torch.float64)


def _quantiles(values: torch.Tensor) -> list[float]:
    return torch.quantile(values.double().flatten()[:16_000_000], QUANTILES).tolist()


def leave_one_out_scores(model: object) -> object:
    """The pseudo scores of the leave-one-out construction; the model's bank is rebuilt from all images after."""
    geometric, photometric = split_transform(model.pre_processor.transform)
    raw = load_images(model.support_paths, geometric)

    def score(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = model.model(images.to(model.device))
        return output.pred_score, output.anomaly_map

    with model.calibration_scoring():
        scores = collect_support_scores(
            raw, photometric, model.fit_support, score, seed=model.few_shot_seed, held_out="leave_one_out"
        )
    model.fit_support(photometric(raw))
    return scores


def cell_record(dataset: str, k: int, seed: int, method: str, model: object, scored: object, test: object) -> dict:
    """What any threshold rule needs of a cell (see the module docstring)."""
    copies = model.support_scores
    loo = leave_one_out_scores(model)
    low, high = float(scored.maps.min()), float(scored.maps.max())
    maps = scored.maps.double()
    masks = test.masks.bool()
    return {
        "dataset": dataset,
        "k": k,
        "seed": seed,
        "method": method,
        "normal_scores": loo.normal_scores.tolist(),
        "defect_scores": loo.defect_scores.tolist(),
        "normal_pixel_quantiles": _quantiles(loo.normal_pixels),
        "defect_pixel_quantiles": _quantiles(loo.defect_pixels),
        "copy_normal_scores": copies.normal_scores.tolist(),
        "copy_defect_scores": copies.defect_scores.tolist(),
        "copy_normal_pixel_quantiles": _quantiles(copies.normal_pixels),
        "copy_defect_pixel_quantiles": _quantiles(copies.defect_pixels),
        "test_scores": scored.scores.tolist(),
        "test_labels": test.labels.tolist(),
        "pixel_range": [low, high],
        "defect_pixel_histogram": torch.histc(maps[masks], PIXEL_BINS, low, high).long().tolist(),
        "normal_pixel_histogram": torch.histc(maps[~masks], PIXEL_BINS, low, high).long().tolist(),
    }


def dump(config: Path, seeds: list[int], out: Path, only: list[str] | None) -> None:
    """Write one record per (cell, method) to ``out`` (JSON lines; test features cached as the benchmark's)."""
    plan = plan_from_config(yaml.safe_load(config.read_text()))
    plan.seeds = seeds
    if only:
        plan.datasets = [data for data in plan.datasets if data.label in only]
    context = RunContext(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        for data, k, seed in plan.cells:
            for method in plan.methods:
                test = context.test_features(data, method)
                model = build_patchcore(method, k, seed, context.device)
                model.prepare_support(context.datamodule(data))
                scored = score_test_set(model, method, test, context.device, 32)
                handle.write(json.dumps(cell_record(data.label, k, seed, method.name, model, scored, test)) + "\n")
                handle.flush()
                print(f"{data.label} k={k} seed={seed} {method.name}: dumped", flush=True)


# ---------------------------------------------------------------------------------------------- analysis
def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Balanced accuracy, detection rate and false-alarm rate of ``score > threshold``."""
    flagged = scores > threshold
    recall, far = flagged[labels].mean(), flagged[~labels].mean()
    return (recall + 1 - far) / 2, recall, far


def oracle_balanced_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """The best balanced accuracy of any threshold."""
    return max(balanced_accuracy(scores, labels, t)[0] for t in np.concatenate([[-np.inf], np.unique(scores)]))


def pixel_f1(record: dict, threshold: float) -> float:
    """Pixel F1 of ``map > threshold`` from the record's histograms (to the bin width)."""
    low, high = record["pixel_range"]
    edges = np.linspace(low, high, PIXEL_BINS + 1)[:-1]
    defect, normal = np.array(record["defect_pixel_histogram"]), np.array(record["normal_pixel_histogram"])
    keep = edges >= threshold
    tp, fp = defect[keep].sum(), normal[keep].sum()
    fn = defect.sum() - tp
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def pixel_f1_max(record: dict) -> float:
    low, high = record["pixel_range"]
    return max(pixel_f1(record, t) for t in np.linspace(low, high, PIXEL_BINS + 1)[:-1:4])


def rule_thresholds(record: dict, construction: str, position: float) -> dict[str, float]:
    """Image threshold of a rule, and the two pixel rules: the image threshold, or a gap of the pixel values."""
    prefix = "copy_" if construction == "copies" else ""
    normal, defect = record[f"{prefix}normal_scores"], record[f"{prefix}defect_scores"]
    highest, median = max(normal), float(np.sort(defect)[(len(defect) - 1) // 2])  # lower median, as the package
    image = highest + position * (median - highest) if median > highest else highest
    if f"{prefix}normal_pixel_quantiles" in record:
        top = record[f"{prefix}normal_pixel_quantiles"][-1]
    else:  # records of the selection runs hold the per-map maxima of the copies instead
        top = max(record["copy_normal_pixel_max"])
    pixel_median = record[f"{prefix}defect_pixel_quantiles"][50]
    pixel_gap = top + position * (pixel_median - top) if pixel_median > top else top
    return {"image": image, "pixel = image": image, "pixel gap": pixel_gap}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def analyse(records: list[dict]) -> str:
    """The table of every rule (Markdown)."""
    for record in records:
        scores, labels = np.array(record["test_scores"]), np.array(record["test_labels"]).astype(bool)
        record["_arrays"] = (scores, labels)
        record["_oracle"] = oracle_balanced_accuracy(scores, labels)
        record["_pixel_max"] = pixel_f1_max(record)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        cells[(record["dataset"], record["method"], record["k"])].append(record)
    lines = [
        "| construction | position | data set | method | BAcc / oracle | worst k | pixel F1 / F1-max "
        "(pixel = image) | (pixel gap) | false alarms k=1/2/4 | detection k=1/2/4 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for construction in ("copies", "leave_one_out"):
        for position in POSITIONS:
            per: dict[tuple[str, str], dict[int, tuple]] = defaultdict(dict)
            for (dataset, method, k), group in cells.items():
                rows = []
                for record in group:
                    rule = rule_thresholds(record, construction, position)
                    bacc, recall, far = balanced_accuracy(*record["_arrays"], rule["image"])
                    rows.append(
                        (
                            bacc / record["_oracle"],
                            far,
                            recall,
                            pixel_f1(record, rule["pixel = image"]) / record["_pixel_max"],
                            pixel_f1(record, rule["pixel gap"]) / record["_pixel_max"],
                        )
                    )
                per[(dataset, method)][k] = tuple(_mean([row[i] for row in rows]) for i in range(5))
            for (dataset, method), by_k in sorted(per.items()):
                ks = sorted(by_k)
                lines.append(
                    f"| {construction} | {position} | {dataset} | {method} | "
                    f"{_mean([by_k[k][0] for k in ks]):.3f} | {min(by_k[k][0] for k in ks):.2f} | "
                    f"{_mean([by_k[k][3] for k in ks]):.2f} | {_mean([by_k[k][4] for k in ks]):.2f} | "
                    f"{'/'.join(f'{by_k[k][1]:.2f}' for k in ks)} | {'/'.join(f'{by_k[k][2]:.2f}' for k in ks)} |"
                )
    seeds = sorted({record["seed"] for record in records})
    return f"Seeds {seeds}, {len(records)} cells.\n\n" + "\n".join(lines)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/benchmark/decision.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    parser.add_argument("--only", nargs="+", default=None, help="only these datasets (labels)")
    parser.add_argument("--dump", type=Path, default=None, help="write the cells' raw records (JSON lines) here")
    parser.add_argument("--analyse", type=Path, nargs="+", default=None, help="judge every rule on these records")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.dump is not None:
        dump(args.config, args.seeds, args.dump, args.only)
    if args.analyse:
        print(analyse([json.loads(line) for path in args.analyse for line in path.read_text().splitlines()]))


if __name__ == "__main__":
    main()
