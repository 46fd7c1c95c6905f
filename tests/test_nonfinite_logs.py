"""A step the NaN guard skips leaves its loss and every loss term out of its log window's means."""

import math

import pytest
import torch
from conftest import make_trainer

from srm_hf.logged_metrics import LoggedMetrics

BAD_STEP = 3  # 1-based: with logging_steps=2, the first of the window of steps 3-4


def poisoned(tmp_path, where: str, **config):
    """A KD run whose optimizer step BAD_STEP has a NaN gradient: `where` is "gradient" (the loss finite, one
    parameter's gradient NaN, as an fp16 overflow in the backward leaves it), "loss" (the student's logits NaN) or
    "first micro-batch" (the logits NaN in the first of the step's micro-batches only)."""
    trainer = make_trainer(tmp_path, method="kd", **config)
    classifier = trainer.distill_model.student.classifier
    forwards = []

    def at_bad_step() -> bool:
        return trainer.model.training and trainer.state.global_step == BAD_STEP - 1

    def poison(module, inputs, logits):
        if at_bad_step():
            forwards.append(None)
            if where == "loss" or len(forwards) == 1:
                return logits * float("nan")

    if where == "gradient":
        classifier[-1].weight.register_hook(lambda grad: grad * float("nan") if at_bad_step() else grad)
    else:
        classifier.register_forward_hook(poison)
    return trainer


def training_logs(trainer) -> dict[int, dict]:
    trainer.train()
    return {e["step"]: e for e in trainer.state.log_history if "loss" in e}


def terms(log: dict) -> dict[str, float]:
    return {k: v for k, v in log.items() if "/" in k}


@pytest.mark.parametrize("where, config", [
    ("gradient", {}),  # fused AdamW: skipped on the device
    ("gradient", {"optim": "adamw_torch"}),  # skipped on the host
    ("loss", {}),
    ("first micro-batch", {"gradient_accumulation_steps": 2}),
])
def test_a_skipped_steps_loss_and_terms_drop_out_of_its_log_windows_means(tmp_path, where, config):
    each = training_logs(poisoned(tmp_path / "each", where, logging_steps=1, **config))
    pairs = training_logs(poisoned(tmp_path / "pairs", where, logging_steps=2, **config))
    assert [e["nonfinite_steps_skipped"] for e in each.values()] == [0, 0, 1, 1]
    alone = each[BAD_STEP]  # a window of skipped steps alone: nothing finite to average
    assert terms(alone) and all(math.isnan(v) for v in terms(alone).values()) and math.isnan(alone["loss"])
    kept = each[BAD_STEP + 1]  # the window of steps 3-4 averages step 4 alone
    assert terms(pairs[BAD_STEP + 1]) == pytest.approx(terms(kept)) and terms(kept)
    assert pairs[BAD_STEP + 1]["loss"] == pytest.approx(kept["loss"])
    assert pairs[2]["loss"] == pytest.approx((each[1]["loss"] + each[2]["loss"]) / 2)  # no skipped step: all kept
    assert terms(pairs[2]) == pytest.approx({k: (v + terms(each[2])[k]) / 2 for k, v in terms(each[1]).items()})


class OneProcess:
    num_processes, device = 1, torch.device("cpu")


@pytest.mark.parametrize("skipped", [False, torch.tensor(False)])  # read on the host, or a flag on the device
def test_a_steps_values_wait_for_the_guards_decision(skipped):
    logged = LoggedMetrics()
    logged.hold()
    logged.add("a/x", torch.tensor(1.0))
    logged.end_step(True)
    logged.add("late/z", 2.0)  # after the decision (a callback at the step's end): kept, whatever comes next
    logged.hold()
    logged.add("a/x", torch.tensor(3.0))
    logged.add("a/y", 5.0)
    logged.end_step(skipped)
    logged.hold()
    logged.add("a/x", float("nan"))  # a non-finite value of a kept step is left out too
    logged.end_step(torch.tensor(True))
    logged.hold()
    logged.add("a/x", 7.0)  # still held at the log: left for the next one
    means = logged.pop_means(OneProcess())
    assert {k: v for k, v in means.items() if k != "a/y"} == {"a/x": 1.0, "late/z": 2.0}
    assert math.isnan(means["a/y"])  # no kept value: NaN
    logged.end_step(True)
    assert logged.pop_means(OneProcess()) == {"a/x": 7.0}


def test_a_compute_loss_override_that_records_no_step_losses_logs_the_trainers_loss(tmp_path):
    """An override that computes the loss itself (no `super().compute_loss`) logs the Trainer's own figure."""
    from srm_hf import DistillationTrainer

    class OwnLoss(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = self.distill_model.student(inputs["pixel_values"])
            logits = logits.logits if hasattr(logits, "logits") else logits
            return torch.nn.functional.cross_entropy(logits, inputs["labels"])

    logs = training_logs(make_trainer(tmp_path, cls=OwnLoss, method="kd", logging_steps=1, max_steps=2))
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in logs.values())


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_without_the_nan_loss_filter_every_steps_loss_and_terms_count(tmp_path, where):
    """logging_nan_inf_filter=False: as in the plain Trainer, each log is the plain mean of its window's steps, a
    non-finite value included; the step is still skipped."""
    each = training_logs(poisoned(tmp_path / "each", where, logging_steps=1, logging_nan_inf_filter=False))
    pairs = training_logs(poisoned(tmp_path / "pairs", where, logging_steps=2, logging_nan_inf_filter=False))
    assert [e["nonfinite_steps_skipped"] for e in each.values()] == [0, 0, 1, 1]
    window = pairs[BAD_STEP + 1]  # steps 3-4
    if where == "loss":  # NaN logits: the loss and both terms NaN, and so the window's means
        assert terms(window) and all(math.isnan(v) for v in terms(window).values()) and math.isnan(window["loss"])
    else:  # a finite loss whose step was skipped: it counts
        assert math.isfinite(each[BAD_STEP]["loss"])
        assert window["loss"] == pytest.approx((each[BAD_STEP]["loss"] + each[BAD_STEP + 1]["loss"]) / 2)
        both = terms(each[BAD_STEP]), terms(each[BAD_STEP + 1])
        assert terms(window) == pytest.approx({k: (v + both[1][k]) / 2 for k, v in both[0].items()})
