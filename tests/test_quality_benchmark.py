"""`recipes/benchmarks/quality.py --quick`: every method, pair and ablation variant runs end to end (the pipeline,
not accuracy), and the report files are written."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes" / "benchmarks"))

import quality  # noqa: E402
import quality_report  # noqa: E402


def test_quick_benchmark_runs_every_method_pair_and_ablation(tmp_path):
    out = tmp_path / "results"
    rows, ablation = quality.main(["--quick", "--out_dir", str(out), "--work_dir", str(tmp_path / "work")])
    assert {(r["pair"], r["method"]) for r in rows} == {(p, m) for p in quality.STUDENTS for m in quality.METHODS}
    for r in rows:
        assert len(r["validation"]) == len(quality.GRID[r["method"]]) and r["setting"] in quality.GRID[r["method"]]
        assert len(r["test"]) == len(quality.QUICK.seeds) and all(0.0 <= a <= 1.0 for a in r["test"])
        assert (r["equal_compute_test"] is None) == (r["method"] == "SRM paper")  # the others get SRM's passes
        assert r["passes"] <= quality.passes(quality.METHODS["SRM paper"], *quality.QUICK.epochs[r["size"]])
    assert [a["variant"] for a in ablation] == list(quality.ABLATION)
    assert all(len(a["test"]) == len(quality.QUICK.ablation_seeds) for a in ablation)
    table = (out / "quality_quick.md").read_text()
    assert table.count("\n| 4 |") == len(rows) and "Teacher: ResNet-18" in table
    assert "## Ablation" in table and table.count("SRM paper vs") == len(quality.STUDENTS)
    saved = json.loads((out / "quality_quick.json").read_text())
    assert saved["rows"] == rows and saved["ablation"] == ablation
    assert (out / "quality_quick.png").read_bytes()[:4] == b"\x89PNG"


def test_verdicts_compare_srm_with_every_other_method():
    rows = [{"size": 10, "pair": "p", "method": m, "test": t} for m, t in
            (("SRM paper", [0.80, 0.82]), ("KD", [0.70, 0.72]), ("AT", [0.81, 0.83]), ("alone", [0.90, 0.91]))]
    (line,) = quality_report.verdicts(rows)
    assert "best mean alone" in line
    assert "KD +10.00 (above)" in line and "AT -1.00 (tied)" in line and "alone -9.50 (below)" in line
