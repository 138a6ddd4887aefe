"""One table from the JSON-lines files written by ``gpu.sh`` (speed benchmarks at several batch sizes).

Usage:
    python scripts/gpu_summary.py results/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    """Print per-image times and ratios to the matching baseline, one row per model and batch size."""
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/gpu")
    print("| model | variant | batch | device | ms / image | ratio to baseline |")
    print("|---|---|---|---|---|---|")
    for line in (folder / "patchcore.jsonl").read_text().splitlines():
        record = json.loads(line)
        times = record["ms_per_image"]
        base = times["PatchCore (baseline)"]
        for name, value in times.items():
            batch, device = record["batch"], record["device"]
            print(f"| PatchCore(Plus) | {name} | {batch} | {device} | {value:.2f} | {value / base:.3f} |")
    path = folder / "winclip.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            times = record["seconds_per_image"]
            base = times["plain"]
            for name, value in times.items():
                print(
                    f"| WinClip(Plus) {record['arch']} | {name} | {record['batch']} | {record['device']} "
                    f"| {1000 * value:.2f} | {value / base:.3f} |"
                )


if __name__ == "__main__":
    main()
