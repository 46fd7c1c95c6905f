"""`recipes/benchmarks/fused_quality.py`: the finished SRM runs of a quality cell, trained again eager and through the
fused kernels (interpreted here), beside the recorded accuracies; restarts skip finished runs; bad cells are named."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes" / "benchmarks"))

import fused_quality  # noqa: E402
import quality  # noqa: E402

PAIR = next(iter(quality.PAIRS))
SIZE, (LAST, BATCH) = next(iter(quality.QUICK.steps.items()))
SETTING = quality.GRID["SRM paper"][1]
JOINT = quality.GRID["SRM joint"][0]


def recorded_file(path: Path, seeds=(0,)) -> Path:
    """A runs file as `quality.py --quick` leaves it: SRM paper's runs of the quick cell, and another method's."""
    key = f"{PAIR}|{SIZE}|{LAST}x{BATCH}"
    records = [{"key": f"{key}|SRM paper|{json.dumps(SETTING)}|{seed}|own", "value": {"test": 0.25 + seed / 10}}
               for seed in seeds]
    records += [{"key": f"{key}|SRM paper|{json.dumps(quality.GRID['SRM paper'][0])}|0|own", "value": {"test": 0.9}},
                {"key": f"{key}|SRM joint|{json.dumps(JOINT)}|0|own", "value": {"test": 0.5}},
                {"key": f"{key}|KD|{json.dumps(quality.GRID['KD'][0])}|0|own", "value": {"test": 0.7}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_seeds_of_the_chosen_setting_are_trained_again_through_the_kernels(tmp_path, monkeypatch):
    recorded = recorded_file(tmp_path / "eager.jsonl", seeds=(0, 1))
    runs, out = tmp_path / "fused.jsonl", tmp_path / "fused_quality.md"
    args = ["--quick", "--cells", f"{PAIR}|{SIZE}", "--methods", "SRM paper", "SRM joint",
            "--recorded_runs", str(recorded), "--runs", str(runs), "--out", str(out),
            "--work_dir", str(tmp_path / "work")]
    trained = []
    run = quality.Cell.run

    def recorded(self, method, setting, seed, last, splits=("test",)):
        trained.append((method["srm_kernels"], setting, seed, last))
        return run(self, method, setting, seed, last, splits)

    monkeypatch.setattr(quality.Cell, "run", recorded)
    results = fused_quality.main(args)
    # SRM paper: the setting with every seed, eager then fused; SRM joint: its one run
    assert trained == [(k, SETTING, seed, LAST) for k in ("eager", "triton") for seed in (0, 1)] + \
        [(k, JOINT, 0, LAST) for k in ("eager", "triton")]
    assert list(results) == [(PAIR, SIZE, "SRM paper"), (PAIR, SIZE, "SRM joint")]
    paper, joint = results.values()
    assert paper["recorded"] == {0: 0.25, 1: 0.35} and joint["recorded"] == {0: 0.5}
    for acc in (paper, joint):
        assert set(acc["eager"]) == set(acc["triton"]) == set(acc["recorded"])
        assert all(0.0 <= a <= 1.0 for a in [*acc["eager"].values(), *acc["triton"].values()])
    table = out.read_text()
    assert "| 0 | 25.00 |" in table and "| 1 | 35.00 |" in table and "mean ± std | 30.00 ± 7.07 |" in table
    assert "SRM joint" in table and "| 0 | 50.00 |" in table
    assert len(runs.read_text().splitlines()) == 6
    trained.clear()  # a restart trains nothing again
    assert fused_quality.main(args) == results and trained == []


def test_a_cell_without_finished_runs_or_of_another_budget_is_named(tmp_path):
    recorded = recorded_file(tmp_path / "eager.jsonl")
    common = ["--quick", "--recorded_runs", str(recorded), "--runs", str(tmp_path / "r.jsonl"), "--out",
              str(tmp_path / "o.md")]
    with pytest.raises(SystemExit):  # argparse: not PAIR|IMAGES_PER_CLASS
        fused_quality.main(["--cells", "no such pair|4", *common])
    other = next(p for p in quality.PAIRS if p != PAIR)
    with pytest.raises(SystemExit, match="No finished SRM paper runs for"):
        fused_quality.main(["--cells", f"{PAIR}|{SIZE}", f"{other}|{SIZE}", *common])
    moved = tmp_path / "moved.jsonl"  # the same cell recorded with another budget
    moved.write_text(recorded.read_text().replace(f"|{LAST}x{BATCH}|", f"|{LAST + 1}x{BATCH}|"))
    with pytest.raises(SystemExit, match="used another budget"):
        fused_quality.main(["--cells", f"{PAIR}|{SIZE}", "--quick", "--recorded_runs", str(moved), "--runs",
                            str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o.md")])
    assert not (tmp_path / "r.jsonl").exists()  # refused before any run was trained
