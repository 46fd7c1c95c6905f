"""`recipes/benchmarks/quality.py --quick`: every method and pair runs end to end (the pipeline, not accuracy), at
its own budget and at SRM paper's measured cost; an interrupted run continues; the report files are written."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes" / "benchmarks"))

import quality  # noqa: E402
import quality_report  # noqa: E402


def test_quick_benchmark_runs_every_method_pair_at_equal_measured_compute(tmp_path, monkeypatch):
    out, work = tmp_path / "results", tmp_path / "work"
    measure = quality.Cell.step_seconds

    def alone_clearly_cheaper(self, methods):  # the real timings, with the student alone made a quarter of SRM's
        seconds = measure(self, methods)  # fastest stage: on a busy machine they can come within half a step,
        fastest = min(seconds["SRM paper"].values())  # and the lengthened runs would not be exercised
        seconds["alone"] = {stage: min(value, fastest / 4) for stage, value in seconds["alone"].items()}
        return seconds

    monkeypatch.setattr(quality.Cell, "step_seconds", alone_clearly_cheaper)
    rows = quality.main(["--quick", "--out_dir", str(out), "--work_dir", str(work)])
    assert {(r["pair"], r["method"]) for r in rows} == {(p, m) for p in quality.PAIRS for m in quality.METHODS}
    for r in rows:
        assert len(r["validation"]) == len(quality.GRID[r["method"]]) and r["setting"] in quality.GRID[r["method"]]
        assert len(r["test"]) == len(quality.QUICK.seeds) and all(0.0 <= a <= 1.0 for a in r["test"])
        if r["equal_compute_test"] is not None:  # lengthened (or shortened) to SRM paper's measured cost
            assert (r["cost_seconds"] < r["srm_cost_seconds"]) == (r["equal_compute_steps"] > r["steps"][-1])
            longer = r["cost_seconds"] + (r["equal_compute_steps"] - r["steps"][-1]) * \
                list(r["seconds_per_step"].values())[-1]
            if r["equal_compute_steps"] > 1:  # (a run is never shortened below one step)
                assert abs(longer - r["srm_cost_seconds"]) <= list(r["seconds_per_step"].values())[-1]
        else:  # as costly as SRM paper, within half a last-stage step
            assert abs(r["srm_cost_seconds"] - r["cost_seconds"]) < list(r["seconds_per_step"].values())[-1]
    alone = next(r for r in rows if r["method"] == "alone")
    assert alone["equal_compute_test"] is not None  # cheaper than SRM paper: lengthened to its cost
    table = (out / "quality_quick.md").read_text()
    assert table.count("\n| ResNet-18 → ") == len(rows) and "## At equal measured compute" in table
    assert table.count("best SRM") == len(quality.PAIRS)
    saved = json.loads((out / "quality_quick.json").read_text())
    assert saved["rows"] == rows
    assert (out / "quality_quick.png").read_bytes()[:4] == b"\x89PNG"
    # a second invocation reads every run back instead of training again
    lines = (out / "quality_quick_runs.jsonl").read_text().count("\n")
    assert quality.main(["--quick", "--out_dir", str(out), "--work_dir", str(work)]) == rows
    assert (out / "quality_quick_runs.jsonl").read_text().count("\n") == lines
    # --report_done trains nothing and leaves out a cell with a missing run
    runs = out / "quality_quick_runs.jsonl"
    kept = [line for line in runs.read_text().splitlines() if "56 px" not in json.loads(line)["key"]
            or "|alone|" not in json.loads(line)["key"]]
    runs.write_text("\n".join(kept) + "\n")
    partial = quality.main(["--quick", "--report_done", "--out_dir", str(out), "--work_dir", str(work)])
    assert partial == [r for r in rows if "56 px" not in r["pair"]]
    assert runs.read_text().count("\n") == len(kept)


def test_verdicts_compare_at_equal_compute():
    def row(method, test, equal=None):
        return {"pair": "p", "size": 10, "method": method, "test": test, "equal_compute_test": equal}

    rows = [row("SRM paper", [0.80, 0.82]), row("SRM joint", [0.84, 0.85], [0.86, 0.86]),
            row("KD", [0.70, 0.72], [0.75, 0.76]), row("alone", [0.60, 0.61], [0.90, 0.91])]
    (line,) = quality_report.verdicts(rows)
    assert "best SRM (SRM joint) vs best other (alone): -4.50 points (below)" in line
    assert "KD +5.50 (above)" in line and "alone -9.50 (below)" in line and "SRM joint -5.00 (below)" in line


def test_srm_search_gives_every_variant_the_same_measured_cost(tmp_path):
    import srm_search

    names = ["alone, lr 3e-3", "KD α 0.9", "SRM paper, shares 20/30/50", "SRM joint 10/90, λ 1"]
    rows = srm_search.main(["--quick", "--out_dir", str(tmp_path), "--work_dir", str(tmp_path / "work"),
                            "--variants", *names])
    assert [r["variant"] for r in rows] == names
    budget = json.loads((tmp_path / "srm_search_4_quick.json").read_text())["meta"]["budget_seconds"]
    for r in rows:
        cost = sum(r["steps"][stage if stage in r["steps"] else "last"] * s
                   for stage, s in r["seconds_per_step"].items())
        biggest = max(r["seconds_per_step"].values())
        assert abs(cost - budget) <= len(r["steps"]) * biggest  # each stage rounded to whole steps
    paper = next(r for r in rows if r["variant"].startswith("SRM paper"))
    assert set(paper["steps"]) == {"dictionary", "srm", "last"}
    assert "| SRM joint 10/90, λ 1 |" in (tmp_path / "srm_search_4_quick.md").read_text()
