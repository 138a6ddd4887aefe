"""Split DeepPCB into one folder per board design, so that support and test boards are the same product.

DeepPCB mixes board designs: the first five digits of a file name name the design (``20085``, ``44000``, ...).
Its ``train/good`` holds 7 designs and its test split 11, four of which (two thirds of the test images) never
appear in ``train/good``. A few-shot draw from ``train/good`` therefore mostly shows other boards than the ones
tested, which is not the task of a user with a few good images of *their* board. This script links, for each
design present in both splits, its files into ``<out>/<design>/`` with DeepPCB's folder layout (``train/good``,
``test/good``, ``test/defect``, ``ground_truth/defect``), for ``configs/benchmark/deeppcb_design.yaml``.
Nothing is copied: the folders hold symbolic links to ``--root``.

Usage:
    python scripts/deeppcb_designs.py --root ../shared/data/deeppcb --out results/deeppcb_designs
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

FOLDERS = ("train/good", "test/good", "test/defect", "ground_truth/defect")


def design(path: Path) -> str:
    """The board design of a DeepPCB file: the first five characters of its name (``20085123_temp.jpg``)."""
    return path.name[:5]


def split_by_design(root: Path, out: Path) -> dict[str, Counter]:
    """Link the files of every design found in both ``train/good`` and the test split; return the counts."""
    trained = {design(p) for p in (root / "train" / "good").iterdir()}
    tested = {design(p) for sub in ("test/good", "test/defect") for p in (root / sub).iterdir()}
    counts: dict[str, Counter] = {}
    for name in sorted(trained & tested):
        counts[name] = Counter()
        for sub in FOLDERS:
            target = out / name / sub
            target.mkdir(parents=True, exist_ok=True)
            for file in sorted((root / sub).iterdir()):
                if design(file) == name:
                    link = target / file.name
                    if not link.exists():
                        link.symlink_to(file.resolve())
                    counts[name][sub] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/deeppcb"))
    parser.add_argument("--out", type=Path, default=Path("results/deeppcb_designs"))
    args = parser.parse_args()
    if not (args.root / "train" / "good").is_dir():
        parser.error(f"--root {args.root} has no train/good folder: point it at the DeepPCB data set.")
    counts = split_by_design(args.root, args.out)
    print("| design | train/good | test/good | test/defect |")
    print("|---|---|---|---|")
    for name, count in counts.items():
        print(f"| {name} | {count['train/good']} | {count['test/good']} | {count['test/defect']} |")


if __name__ == "__main__":
    main()
