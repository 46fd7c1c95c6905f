"""Fault injection on checkpoints: a run killed (SIGKILL) while writing a checkpoint resumes from the previous
complete one and ends where an uninterrupted run ends; an interrupted checkpoint is never resumed from."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S
from safetensors.torch import load_file

from srm_hf.checkpoint import COMPLETE_NAME
from srm_hf.resume import resolve_resume

SCRIPT = Path(__file__).resolve().parent / "checkpoint_run.py"


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors") | load_file(out / "final" / "method_state.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_weights(out)


@pytest.mark.parametrize("point, limit", [("start", None), ("student", None), ("marker", None), ("marker", 1)])
def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(tmp_path, uninterrupted, point,
                                                                                   limit):
    # 2 dictionary + 2 SRM + 2 KD steps, a checkpoint every 2 steps; killed while writing checkpoint-4; with
    # save_total_limit=1, checkpoint-2 is removed only once checkpoint-4 is complete
    limited = ("--save_total_limit", str(limit)) if limit else ()
    killed = run(tmp_path, "--kill", f"4:{point}", *limited)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = tmp_path / "out"  # the run's output_dir
    assert (checkpoints / "checkpoint-2" / COMPLETE_NAME).is_file()
    assert not (checkpoints / "checkpoint-4" / COMPLETE_NAME).exists()
    assert resolve_resume(str(checkpoints), True) == str(checkpoints / "checkpoint-2")
    with pytest.raises(ValueError, match="not a complete checkpoint" if point != "start" else "no such folder"):
        resolve_resume(str(checkpoints), str(checkpoints / "checkpoint-4"))  # (killed at "start": not yet made)
    resumed = run(tmp_path, "--resume", *limited)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "newest complete checkpoint" in resumed.stderr
    weights = final_weights(tmp_path)
    assert weights.keys() == uninterrupted.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)
    if limit:  # the resumed run's checkpoint-4, complete, was rotated out once checkpoint-6 was
        assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-6"]
    else:
        assert (checkpoints / "checkpoint-4" / COMPLETE_NAME).is_file()  # rewritten whole by the resumed run


def test_resume_true_without_a_complete_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path), True)
