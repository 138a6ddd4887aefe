"""``scripts/deeppcb_designs.py``: one folder per DeepPCB board design, for designs in both splits only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _script():
    path = Path(__file__).parents[1] / "scripts" / "deeppcb_designs.py"
    spec = importlib.util.spec_from_file_location("deeppcb_designs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["deeppcb_designs"] = module
    spec.loader.exec_module(module)
    return module


def test_designs_in_both_splits_get_a_folder_of_links_with_deeppcb_layout(tmp_path: Path) -> None:
    root = tmp_path / "deeppcb"
    files = {
        "train/good": ["11111001_temp.jpg", "11111002_temp.jpg", "22222001_temp.jpg"],
        "test/good": ["11111100_temp.jpg", "33333100_temp.jpg"],
        "test/defect": ["11111200_test.jpg", "33333200_test.jpg"],
        "ground_truth/defect": ["11111200_test.png", "33333200_test.png"],
    }
    for folder, names in files.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            (root / folder / name).write_text(name)
    counts = _script().split_by_design(root, tmp_path / "out")
    # 22222 is never tested and 33333 never in train/good: only 11111 is a few-shot task.
    assert sorted(counts) == ["11111"]
    assert dict(counts["11111"]) == {"train/good": 2, "test/good": 1, "test/defect": 1, "ground_truth/defect": 1}
    link = tmp_path / "out" / "11111" / "test" / "defect" / "11111200_test.jpg"
    assert link.is_symlink()
    assert link.read_text() == "11111200_test.jpg"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["11111"]
