"""`recipes/benchmarks/quality.py --quick`: every method and pair runs end to end (the pipeline, not accuracy)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes" / "benchmarks"))

import quality  # noqa: E402


def test_quick_benchmark_runs_every_method_and_pair(tmp_path):
    rows = quality.main(["--quick", "--out_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work")])
    assert {(r["pair"], r["method"]) for r in rows} == {(p, m) for p in quality.STUDENTS for m in quality.METHODS}
    for r in rows:
        assert len(r["validation"]) == len(quality.GRID[r["method"]]) and r["setting"] in quality.GRID[r["method"]]
        assert len(r["test"]) == len(quality.QUICK.seeds) and all(0.0 <= a <= 1.0 for a in r["test"])
        assert (r["equal_compute_test"] is None) == (r["method"] == "SRM paper")  # the others get SRM's passes
    table = (tmp_path / "results" / "quality_quick.md").read_text()
    assert table.count("\n| 4 |") == len(rows) and "Teacher (ResNet-18, full training split)" in table
    assert json.loads((tmp_path / "results" / "quality_quick.json").read_text()) == rows
