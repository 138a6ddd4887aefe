r"""How often does self-calibration pick the setting that is best on the real test set?

For every (dataset, k, seed) the candidates (plain PatchCore and refiner configurations of
``refinement_study.py``) are calibrated on the k support images alone
(:func:`anomalib_protorefine.calibration.calibrate`: synthetic defects pasted into held-out support
images), and the pick is compared with the candidates' real test metrics, read from the result
files of ``refinement_study.py`` for the same draws (image AUROC + pixel AUROC of the
``--scoring``/``--agg`` columns).

Usage:
    python scripts/calibration_study.py --datasets bsdata --k 1 2 4 --seeds 0 1 2 3 4 \\
        --candidates baseline paper:geo_refined --results results/study/sel_bsdata_k12.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torchvision.transforms.v2 import Compose, Normalize, Resize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomalib_protorefine import PrototypeRefiner
from anomalib_protorefine.calibration import calibrate
from anomalib_protorefine.few_shot import support_from_dataset
from refinement_study import CONFIGS, add_model_arguments, cached_split, make_model


def real_metrics(paths: list[Path], agg: str) -> dict[tuple, float]:
    """(dataset, k, seed, "config:scoring") -> image AUROC + pixel AUROC on the real test set."""
    out = {}
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["agg"] == agg:
                name = "baseline" if r["config"] == "baseline" else f"{r['config']}:{r['scoring']}"
                if r["scoring"] != "nn_centred":
                    out[(r["dataset"], r["k"], r["seed"], name)] = r["image_auroc"] + r["pixel_auroc"]
    return out


def candidate_refiner(name: str) -> PrototypeRefiner | None:
    """The refiner of a candidate ``"baseline"`` or ``"config:scoring"`` (scoring refined, matched or geo_*)."""
    if name == "baseline":
        return None
    config, scoring = name.split(":")
    options = dict(CONFIGS[config])
    options["scoring_bank"] = scoring.removeprefix("geo_")
    if scoring.startswith("geo_"):
        options["score_fusion"] = "geometric"
    return PrototypeRefiner(**options)


def main() -> None:
    """Calibrate every cell and print how the picks fare on the real test set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["bsdata"])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--candidates", nargs="+", default=["baseline", "paper:geo_refined"], help='"baseline" or "config:scoring"'
    )
    parser.add_argument("--results", nargs="+", type=Path, required=True)
    parser.add_argument("--agg", default="max")
    add_model_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.image_size, args.image_size)
    model = make_model(args)
    transform = model.pre_processor.transform
    assert isinstance(transform, Compose)
    resize = Resize(size, antialias=True)
    normalize = next(t for t in transform.transforms if isinstance(t, Normalize))
    real = real_metrics(args.results, args.agg)
    refiners = {c: candidate_refiner(c) for c in args.candidates}

    def fit_bank(images: torch.Tensor) -> tuple[int, int]:
        model.fit_support(images)
        _, grid = model.model.embed(images[:1])
        return grid

    def scorer(refiner: PrototypeRefiner | None):  # noqa: ANN202
        def score(images: torch.Tensor) -> torch.Tensor:
            model.model.refiner = refiner
            embedding, _ = model.model.embed(images)
            return model.model.patch_scores(embedding)

        return score

    stats: dict[int, list[dict]] = defaultdict(list)
    for dataset in args.datasets:
        split = cached_split(model, args, dataset)
        for k in args.k:
            for seed in args.seeds:
                keys = [(dataset, k, seed, c) for c in args.candidates]
                if not all(key in real for key in keys):
                    print(f"  {dataset} k={k} seed={seed}: no real-test results for every candidate, skipped")
                    continue
                support = support_from_dataset(split["train"], k, seed, resize)
                model.few_shot_seed = seed
                tic = time.perf_counter()
                with torch.inference_mode():
                    result = calibrate(
                        support.images,
                        normalize,
                        fit_bank,
                        {c: scorer(r) for c, r in refiners.items()},
                        seed=seed,
                    )
                seconds = time.perf_counter() - tic
                values = {c: real[(dataset, k, seed, c)] for c in args.candidates}
                best = max(values, key=lambda c: values[c])
                row = {
                    "dataset": dataset,
                    "k": k,
                    "seed": seed,
                    "pick": result.choice,
                    "best": best,
                    "regret": values[best] - values[result.choice],
                    "gain_vs_baseline": values[result.choice] - values.get("baseline", float("nan")),
                    "seconds": seconds,
                    "calibration": result.scores,
                }
                stats[k].append(row)
                print(json.dumps(row), flush=True)
    print("\n| k | cells | picks the real best | mean regret (img+px AUROC, points) | gain of the pick vs baseline |")
    print("|---|---|---|---|---|")
    for k, rows in sorted(stats.items()):
        hits = sum(r["pick"] == r["best"] for r in rows)
        regret = 100 * sum(r["regret"] for r in rows) / len(rows)
        gain = 100 * sum(r["gain_vs_baseline"] for r in rows) / len(rows)
        print(f"| {k} | {len(rows)} | {hits}/{len(rows)} | {regret:.2f} | {gain:+.2f} |")


if __name__ == "__main__":
    main()
