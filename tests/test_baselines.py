"""The baselines run on the same trainer, taps and data: only the loss (and the stages) differ."""

import pytest
from conftest import changed, make_trainer, snapshot


def run(tmp_path, method, **config):
    steps = {"fitnet_max_steps": 3} if method == "fitnet" else {}
    trainer = make_trainer(tmp_path, method=method, max_steps=3, **steps, **config)
    calls = []
    trainer.teacher.register_forward_hook(lambda *a: calls.append(1))
    before = snapshot(trainer.distill_model)
    trainer.train()
    return trainer, before, snapshot(trainer.distill_model), len(calls)


def names(trainer):
    return {k for e in trainer.state.log_history for k in e if "/" in k}


def test_student_alone_never_runs_the_teacher(tmp_path):
    trainer, before, after, teacher_calls = run(tmp_path, "alone")
    assert [s.name for s in trainer.plan.stages] == ["ce"] and teacher_calls == 0
    assert names(trainer) == {"ce/ce"} and changed(before, after, "student.")
    assert not list(trainer.method.parameters()) and trainer.tap_pairs == []


def test_kd(tmp_path):
    trainer, before, after, teacher_calls = run(tmp_path, "kd")
    assert [s.name for s in trainer.plan.stages] == ["kd"] and teacher_calls == 3
    assert names(trainer) == {"kd/kd", "kd/ce"} and changed(before, after, "student.")


def test_fitnet_hint_stage_then_kd(tmp_path):
    trainer, before, after, _ = run(tmp_path, "fitnet")
    assert [s.name for s in trainer.plan.stages] == ["hint", "kd"]
    assert names(trainer) == {"hint/mse", "kd/kd", "kd/ce"}
    for pair in trainer.tap_pairs:
        assert trainer.distill_model.method.regressors[pair.key].weight.shape == (pair.student.channels,
                                                                             pair.teacher.channels)
    assert changed(before, after, "method.regressors.") and changed(before, after, "student.resnet.")
    hint_steps = [e["step"] for e in trainer.state.log_history if "hint/mse" in e]
    assert hint_steps == [1, 2, 3]


def test_attention_transfer(tmp_path):
    trainer, before, after, _ = run(tmp_path, "at")
    assert [s.name for s in trainer.plan.stages] == ["at"]
    assert names(trainer) == {"at/at", "at/kd", "at/ce"}
    assert all(e["at/at"] > 0 for e in trainer.state.log_history if "at/at" in e)
    assert changed(before, after, "student.")


def test_baselines_have_no_dictionary(tmp_path):
    trainer = make_trainer(tmp_path, method="kd")
    with pytest.raises(ValueError, match=r"no stage \['dictionary'\]"):
        trainer.train_stages(["dictionary"])
