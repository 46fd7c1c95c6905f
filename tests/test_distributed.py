"""Two processes over gloo (real DDP on the CPU) against one process at the same global batch.

`accelerate launch --num_processes 2` alone runs ONE process on a CPU machine; `--multi_gpu` with
ACCELERATE_USE_CPU=1 starts two and wraps the student in DDP over gloo.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import HANG_GUARD_S, make_trainer, pretrain_dictionary
from test_accumulation import NormFreeNet

from srm_hf.resume import read_marker

HERE = Path(__file__).resolve().parent


def launch(out: Path, mode: str, processes: int, batch: int, dictionary: str = "") -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "SRM_DICTIONARY": dictionary}
    if processes == 1:
        cmd = [sys.executable, str(HERE / "distributed_run.py")]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", "0", str(HERE / "distributed_run.py")]
    done = subprocess.run(cmd + [str(out), mode, str(batch)], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


@pytest.mark.parametrize("mode", ["paper", "joint", "joint+channels_last", "paper+dictionary"])
def test_two_processes_match_one(tmp_path, mode):
    dictionary = ""
    if mode.endswith("dictionary"):  # learnt here, loaded by every rank: its coders frozen, out of DDP's buckets
        dictionary = pretrain_dictionary(make_trainer(tmp_path / "d", teacher=NormFreeNet(16, 0),
                                                      student=NormFreeNet(8, 1), srm_dictionary_max_steps=2))
    rank0, rank1 = launch(tmp_path / "two", mode, processes=2, batch=8, dictionary=dictionary)
    (single,) = launch(tmp_path / "one", mode, processes=1, batch=16, dictionary=dictionary)
    if dictionary:
        assert len(rank0["losses"]) == 4  # stages srm and kd only
        for k, v in safetensors.torch.load_file(dictionary).items():
            assert torch.equal(rank0["state"][f"method.coders.{k}"], v), k
    assert rank0["world"] == 2 and single["world"] == 1
    assert rank0["nhwc"] and set(rank0["nhwc"] + single["nhwc"]) == {mode.endswith("channels_last")}
    # the student (with its dictionaries and heads) is wrapped in DDP; the teacher never is, and stays frozen
    assert rank0["model_type"] == "DistributedDataParallel"
    assert rank0["teacher_unwrapped"] and not rank0["teacher_grad"]
    # dictionaries and heads (and the student) identical on every rank
    for k, v in rank0["state"].items():
        assert torch.equal(v, rank1["state"][k]), k
    # same losses and same final student as one process with the same global batch
    assert [s for s, _ in rank0["losses"]] == [s for s, _ in single["losses"]]
    for (_, a), (_, b) in zip(rank0["losses"], single["losses"]):
        assert abs(a - b) < 1e-5 * max(1.0, abs(a))
    for k, v in single["state"].items():
        torch.testing.assert_close(rank0["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # files come from the main process only: one student save per checkpoint plus the final one
    written = {p.name for p in (tmp_path / "two" / "out").iterdir()}
    checkpoints = [name for name in written if name.startswith("checkpoint-")]
    assert "checkpoint-3" in checkpoints and {"model.safetensors", "method_state.safetensors"} <= written
    assert rank0["writes"].count("save_distillation_model") == len(checkpoints) + 1 and rank1["writes"] == []
    # log_metric values matched by name over the ranks that logged them, pooled
    assert rank0["probes"] and all(p == {"probe/a": 1.0, "probe/b": 15.0, "probe/c": 5.0} for p in rank0["probes"])
    assert all(p == {"probe/a": 1.0, "probe/b": 10.0} for p in single["probes"])
    # each checkpoint is marked complete once every rank's files are written (rank 1 writes its RNG state late)
    for name in checkpoints:
        folder = tmp_path / "two" / "out" / name
        assert read_marker(str(folder))["written_ns"] >= (folder / "rng_state_1.pth").stat().st_mtime_ns


def test_the_recipe_gives_its_compared_runs_one_length_on_every_process(tmp_path):
    """Each process times the steps on its own; the compared runs' lengths follow the main process's times on all
    of them. Otherwise one process would stop its run early and the other wait for it forever."""
    from test_recipes import TINY, tiny_fashion_idx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", str(HERE / "distributed_recipe_run.py"), str(tmp_path),
           "--dataset_dir", tiny_fashion_idx(tmp_path), *TINY, "--compare", "kd", "--report", "false",
           "--eval_strategy", "no"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"lengths-rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and [name for name, _ in rank0] == ["run", "kd"]
    steps = json.loads((tmp_path / "run" / "results.json").read_text())["equal_compute"]["steps"]
    assert steps == {"kd": rank0[1][1]} == {"kd": round(0.01 * 6 / 0.004)}  # 6 SRM steps at rank 0's times
