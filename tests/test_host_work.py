"""The host's work per training step: waits for the device, and `recipes/benchmarks/host_overhead.py`.

A training step makes the host wait for the device only where it must.

On a GPU every `.item()`, `bool(tensor)` or data-dependent shape stops the host from queueing the next kernels;
small models, whose steps are bound by kernel launches, pay it in full. The waits are counted here on the CPU, at
the dispatcher: the ops that copy a value to the host (`_local_scalar_dense`) or whose output shape depends on the
data. The plain `transformers.Trainer` makes its own (its NaN-loss filter, `logging_nan_inf_filter`);
DistillationTrainer adds none with the default fused AdamW, whose step is skipped on the device when the gradient is
not finite, and one with other optimizers (the non-finite gradient check reads the norm).

The host's other cost is the number of operators it dispatches per step: the fused SRM step keeps to a budget per
tap (`recipes/benchmarks/ops_per_step.py`).
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import PatternDataset, hf_resnet, make_trainer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer, TrainerCallback, TrainingArguments

from srm_hf.fused import triton_available

HOST_WAITS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
              "aten.unique_consecutive", "aten.repeat_interleave"}


class HostWaits(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        boolean_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in HOST_WAITS or boolean_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class CountPerStep(TrainerCallback):
    """Host waits from each optimizer step's start to its end (logging, saving and evaluation come after)."""

    def __init__(self):
        self.per_step: list[list[str]] = []
        self.mode = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.mode = HostWaits().__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.mode.__exit__(None, None, None)
        self.per_step.append(self.mode.ops)


class StudentWithLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = hf_resnet()

    def forward(self, pixel_values, labels):
        logits = self.student(pixel_values).logits
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def plain_trainer_waits(tmp_path, **options) -> list[str]:
    counter = CountPerStep()
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), per_device_train_batch_size=8, max_steps=4,
                             logging_steps=100, save_strategy="no", report_to="none", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, **options)
    Trainer(model=StudentWithLoss(), args=args, train_dataset=PatternDataset(32), callbacks=[counter]).train()
    assert len({tuple(ops) for ops in counter.per_step}) == 1, counter.per_step
    return counter.per_step[0]


@pytest.mark.parametrize("method, extra", [
    ("alone", {}), ("kd", {}), ("srm", {}), ("srm", {"srm_mode": "joint"}), ("fitnet", {"fitnet_max_steps": 4}),
    ("at", {}), ("dkd", {}), ("reviewkd", {}),
])
def test_each_step_of_every_method_waits_for_the_device_as_the_plain_trainer_does(tmp_path, method, extra):
    plain = plain_trainer_waits(tmp_path)
    counter = CountPerStep()
    trainer = make_trainer(tmp_path, method=method, logging_steps=100, callbacks=[counter], **extra)
    trainer.train()
    assert len(counter.per_step) == trainer.plan.total_steps  # every step of every stage
    for step, ops in enumerate(counter.per_step, 1):
        stage = trainer.plan.stage_at(step - 1).name
        assert sorted(ops) == sorted(plain), (stage, step, ops, plain)


def test_an_optimizer_without_found_inf_makes_the_non_finite_check_wait_once_per_step(tmp_path):
    plain = plain_trainer_waits(tmp_path, optim="adamw_torch")  # the unfused AdamW reads its step counts too
    counter = CountPerStep()
    make_trainer(tmp_path, method="kd", optim="adamw_torch", logging_steps=100, callbacks=[counter]).train()
    assert counter.per_step == [sorted(plain + ["aten._local_scalar_dense"])] * 4


def test_without_the_nan_loss_filter_a_step_never_waits_for_the_device(tmp_path):
    """logging_nan_inf_filter=False takes the plain Trainer's own waits away (host_overhead.py --no_nan_filter)."""
    assert plain_trainer_waits(tmp_path, logging_nan_inf_filter=False) == []
    for method, extra in [("kd", {}), ("srm", {"srm_mode": "joint"})]:
        counter = CountPerStep()
        trainer = make_trainer(tmp_path / method, method=method, logging_steps=100, callbacks=[counter],
                               logging_nan_inf_filter=False, **extra)
        trainer.train()
        assert counter.per_step == [[]] * trainer.plan.total_steps, method


def test_the_counter_sees_the_waits_it_looks_for():
    x = torch.randn(6)
    with HostWaits() as mode:
        float(x.sum()), bool(x[0] > 0), x.nonzero(), x[x > 0], x.masked_select(x > 0)
    assert mode.ops == ["aten._local_scalar_dense"] * 2 + ["aten.nonzero", "aten.index", "aten.masked_select"]


def test_the_host_overhead_benchmark_times_every_run_and_writes_its_table(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "benchmarks"))
    import host_overhead

    out = tmp_path / "host.md"
    host_overhead.main(["--steps", "9", "--warmup", "3", "--repeats", "1", "--no_nan_filter", "--out", str(out)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.read_text().splitlines()
            if line.startswith("| ") and "ms per step" not in line}
    expected = ["bare loop, alone", "bare loop, KD", "Trainer alone", "Trainer KD"] + [
        f"Trainer SRM paper: {stage} stage" for stage in ("dictionary", "SRM", "KD")] + [
        "Trainer alone, no NaN-loss filter", "Trainer KD, no NaN-loss filter"]
    assert list(rows) == expected
    assert all(float(cells[0]) > 0 for cells in rows.values())
    for row in ("Trainer KD", "Trainer KD, no NaN-loss filter"):  # the Trainer's addition over the bare loop
        assert rows[row][2].strip(" |").startswith(("+", "-"))
    with pytest.raises(SystemExit):
        host_overhead.main(["--steps", "3", "--warmup", "3"])  # nothing left to time


@pytest.mark.skipif(not triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the fused steps on the CPU need Triton and TRITON_INTERPRET=1 (conftest sets it)")
def test_the_fused_srm_step_stays_within_its_operator_budget(tmp_path):
    """`recipes/benchmarks/ops_per_step.py`: operators dispatched per step, what a fast GPU's host pays for, and of
    them those that queue device work, what a CUDA graph replays. The fused SRM step (4 taps here) dispatches fewer
    than the eager one. With the projections inside the kernels (`srm_kernel_projections`), at most 24 per tap
    beyond a KD step (8 of them device work): the teacher's targets and the student's heads projected in their
    kernels, one autograd node per tap's loss, sums finished inside them; the dictionary step at most 20 per tap
    beyond a teacher forward (6 device work: stage 1 in two kernels and a matmul per tap, wide dictionaries too, the
    optimizer's step). With torch's projections (the default) at most 32 and 12 per tap for the joint step, 32 and
    13 for the dictionary step (31, 11.75, 31 and 12.25 here). A per-tap chain of small ops, or a reduction kernel
    after each launch, fails this."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "benchmarks"))
    import ops_per_step

    out = tmp_path / "ops.md"
    ops = ops_per_step.main(["--fused", "--out", str(out)])
    counts = {name: sum(step.values()) for name, step in ops.items()}
    device = {name: ops_per_step.device_work(step) for name, step in ops.items()}
    assert "| SRM joint step, fused |" in out.read_text()
    taps = 4  # layer1-3 and the pooled vector of ResNet-18 → ResNet-10t at 28 px
    budgets = {", fused": (32, 12, 32, 13), ", fused, kernel projections": (24, 8, 20, 6)}
    for suffix, (joint, joint_device, dictionary, dictionary_device) in budgets.items():
        for stage in ("joint", "stage-2"):
            assert counts[f"SRM {stage} step{suffix}"] < counts[f"SRM {stage} step"]
        assert counts[f"SRM joint step{suffix}"] - counts["KD step"] <= joint * taps
        assert device[f"SRM joint step{suffix}"] - device["KD step"] <= joint_device * taps
        assert counts[f"dictionary step{suffix}"] < counts["dictionary step"]
        assert counts[f"dictionary step{suffix}"] - counts["teacher forward"] <= dictionary * taps
        assert device[f"dictionary step{suffix}"] - device["teacher forward"] <= dictionary_device * taps


def test_the_graph_step_benchmark_runs_every_step_eagerly_on_the_cpu(tmp_path):
    """`recipes/benchmarks/graph_step.py` on the CPU: every eager step runs (with the optimizer swapped in and the batch
    copied in first, as for the graphs) and the table says that the graph columns need CUDA. The captures themselves
    run only on a GPU (`gpu_checks.sh graphs`): nothing here checks them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "benchmarks"))
    import graph_step

    out = tmp_path / "graphs.md"
    times = graph_step.main(["--steps", "2", "--warmup", "1", "--size", "32", "--batch", "2", "--teacher", "resnet18",
                             "--student", "resnet10t", "--out", str(out)])
    assert list(times) == ["floor: student step + teacher forward", "KD step", "SRM joint step", "SRM stage-2 step",
                           "teacher forward", "dictionary step"]
    text = out.read_text()
    assert "graphs need CUDA" in text and text.count("| — | — |") == 6
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # before any model is built
            graph_step.main(["--device", "cuda"])


def test_the_launch_cost_benchmark_times_aten_operators_and_every_triton_row_runs(tmp_path):
    """`recipes/benchmarks/launch_cost.py`: on the CPU the ATen rows are timed and the table says the Triton rows need
    CUDA; every Triton row's call (only timed on a GPU) runs here through the interpreter, so that a GPU call does
    not fail on its arguments."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "benchmarks"))
    import launch_cost

    out = tmp_path / "launch.md"
    times = launch_cost.main(["--calls", "20", "--repeats", "2", "--out", str(out)])
    assert list(times) == [row for row in launch_cost.operators("cpu", triton=False)]
    assert all(row.startswith("ATen") and us > 0 for row, us in times.items())
    assert "The Triton rows need CUDA" in out.read_text()
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        rows = launch_cost.operators("cpu", triton=True)
        triton_rows = [row for row in rows if not row.startswith("ATen")]
        assert len(triton_rows) == 4
        for row in triton_rows:
            rows[row]()
