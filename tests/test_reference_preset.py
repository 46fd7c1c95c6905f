"""`preset="reference"`: the SRM authors' optimizer, schedule, clipping and per-stage model selection."""

import json
import os

import pytest
import torch
from conftest import PatternDataset, make_config, make_trainer

from srm_hf.reference import phase_starts, step_decay

# 32 training images, batch 8: 4 steps per epoch; 3 epochs per stage -> 12 + 12 + 12 steps
REFERENCE = dict(preset="reference", eval_strategy="epoch", max_steps=-1, num_train_epochs=3,
                 srm_dictionary_max_steps=-1, srm_max_steps=-1, srm_dictionary_epochs=3, srm_epochs=3)


def test_preset_settings_and_refusals(tmp_path):
    args = make_config(tmp_path, **REFERENCE)
    assert args.max_grad_norm == 0.0 and args.weight_decay == 1e-4  # no clipping, coupled L2 1e-4
    assert make_config(tmp_path, **REFERENCE, weight_decay=5e-4).weight_decay == 5e-4
    with pytest.raises(ValueError, match="own schedule.*lr_scheduler_type"):
        make_config(tmp_path, **REFERENCE, lr_scheduler_type="cosine")
    with pytest.raises(ValueError, match="own schedule.*warmup_steps"):
        make_config(tmp_path, **REFERENCE, warmup_steps=2)
    with pytest.raises(ValueError, match="eval_strategy='epoch'"):
        make_config(tmp_path, **{**REFERENCE, "eval_strategy": "no"})
    with pytest.raises(ValueError, match="preset='bogus'"):
        make_config(tmp_path, preset="bogus")
    with pytest.raises(ValueError, match="eval_dataset"):  # the Trainer's own check: epoch evaluation needs one
        from conftest import hf_resnet, timm_resnet

        from srm_hf import DistillationTrainer
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=make_config(tmp_path, **REFERENCE),
                            train_dataset=PatternDataset(32))
    with pytest.raises(ValueError, match=r"one validation set.*dict of \['a', 'b'\]"):  # before any stage runs
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=make_config(tmp_path, **REFERENCE),
                            train_dataset=PatternDataset(32),
                            eval_dataset={"a": PatternDataset(8), "b": PatternDataset(8, seed=1)})


def test_coupled_adam_on_every_student_parameter(tmp_path):
    trainer = make_trainer(tmp_path, **REFERENCE)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.Adam  # L2 added to the gradient, not AdamW's decoupled decay
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]}
    student = list(trainer.distill_model.student.named_parameters())
    assert any("norm" in n or "bias" in n for n, _ in student)
    assert all(id(p) in decay for _, p in student)  # BatchNorm and biases included
    heads = list(trainer.distill_model.method.heads.named_parameters())
    assert any("bias" in n for n, _ in heads) and all(id(p) in decay for _, p in heads)  # the method's modules too
    coders = next(g for g in optimizer.param_groups if g["stage_group"] == "coders")
    assert coders["weight_decay"] == 0.0 and coders["lr"] == 1e-3
    # the Trainer-style default keeps AdamW and exempts norms and biases
    plain = make_trainer(tmp_path, weight_decay=1e-4)
    default = plain.create_optimizer()
    assert type(default) is torch.optim.AdamW
    assert sum(len(g["params"]) for g in default.param_groups if g["weight_decay"] == 0.0 and
               g["stage_group"] == "student") > 0
    decayed = {id(p) for g in default.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    tagged = {id(p): g["stage_group"] for g in default.param_groups for p in g["params"]}
    rule = set(plain.get_decay_parameter_names(plain.distill_model.student))  # the Trainer's: no biases, ...
    for name, p in plain.distill_model.student.named_parameters():
        assert (id(p) in decayed) == (name in rule) and tagged[id(p)] == "student", name
    heads = list(plain.distill_model.method.heads.named_parameters())  # ... and the same for the method's modules
    assert {n.split(".")[-1] for n, _ in heads} == {"weight", "bias"}
    assert all((id(p) in decayed) == (n.endswith("weight")) and tagged[id(p)] == "heads" for n, p in heads)


def test_a_method_module_without_weight_decay_keeps_one_group(tmp_path):
    optimizer = make_trainer(tmp_path).create_optimizer()  # weight_decay 0: nothing to split the heads by
    assert [g["stage_group"] for g in optimizer.param_groups] == ["student", "student", "coders", "heads"]


def test_resuming_optimizer_state_of_other_groups_is_refused_naming_them(tmp_path):
    make_trainer(tmp_path, save_strategy="steps", save_steps=6).train()
    split = make_trainer(tmp_path, weight_decay=0.1)  # the heads' biases now in a group of their own
    with pytest.raises(ValueError, match="other optimizer or schedule settings \\(weight_decay: 0.0 there, 0.1 here"):
        split.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    marker = tmp_path / "out" / "checkpoint-6" / "checkpoint_complete.json"  # as a checkpoint that records no
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "settings": None}))  # settings: the groups tell
    with pytest.raises(ValueError, match="optimizer state for 4 parameter groups.*has 5 of.*weight_decay"):
        split.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-12", "checkpoint-6"]  # nothing trained or written


def test_step_decay_per_stage_with_fresh_moments_at_each_drop(tmp_path):
    # the reference's epoch shares: dictionary 10/60/30, SRM 30/100/30, last stage 30/100/70
    assert phase_starts("dictionary", 100, last=False) == [10, 70]
    assert phase_starts("srm", 160, last=False) == [30, 130]
    assert phase_starts("kd", 200, last=True) == [30, 130]
    assert [step_decay("dictionary", 10, False)(s) for s in (0, 1, 6, 7, 9)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])

    trainer = make_trainer(tmp_path, **REFERENCE, learning_rate=1e-3)
    moments_at_start = []
    original = trainer.training_step

    def step(model, inputs, num_items_in_batch=None):  # measured before the optimizer step: empty if reset
        out = original(model, inputs, num_items_in_batch)
        stage = trainer.plan.stage_at(trainer.state.global_step)
        group = next(g for g in trainer.optimizer.param_groups if g["stage_group"] in stage.groups)
        moments_at_start.append(len(trainer.optimizer.state.get(group["params"][0], {})))
        return out

    trainer.training_step = step
    trainer.train()
    rates = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    # 12 steps per stage: drops at steps 1 and 8 (dictionary), 2 and 9 (srm), 1 and 7 (kd)
    expected = [1e-3] + [1e-4] * 7 + [1e-5] * 4 + [1e-3] * 2 + [1e-4] * 7 + [1e-5] * 3 + [1e-3] + [1e-4] * 6 + [1e-5] * 5
    assert rates == pytest.approx(expected)
    # the optimizer state of what the stage trains is empty after a drop: the step that follows starts afresh
    resets = [i for i, n in enumerate(moments_at_start) if n == 0]
    assert resets == [0, 1, 8, 12, 14, 21, 24, 25, 31]


def test_each_stage_keeps_its_best_epoch(tmp_path, monkeypatch):
    from srm_hf.reference import StageSelection

    # scores by epoch (lower is better): the dictionary's best is its 2nd epoch, SRM's its 1st; the last stage's
    # accuracies make its 2nd epoch the best
    scores = iter([3.0, 1.0, 2.0, 0.5, 0.9, 0.7])
    monkeypatch.setattr(StageSelection, "score", lambda self, stage: next(scores))
    accuracies = iter([0.5, 0.9, 0.7])
    snapshots = {}

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            model = trainer.distill_model
            snapshots[state.global_step] = {
                "coders": {k: v.clone() for k, v in model.method.coders.state_dict().items()},
                "student": {k: v.clone() for k, v in model.student.state_dict().items()},
                "heads": {k: v.clone() for k, v in model.method.heads.state_dict().items()},
            }

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step in (12, 24):  # first step of SRM / of KD: what the previous stage left
                model = trainer.distill_model
                snapshots[f"start {state.global_step}"] = {
                    "coders": {k: v.clone() for k, v in model.method.coders.state_dict().items()},
                    "student": {k: v.clone() for k, v in model.student.state_dict().items()},
                    "heads": {k: v.clone() for k, v in model.method.heads.state_dict().items()},
                }

    trainer = make_trainer(tmp_path, callbacks=[Snapshot()], **REFERENCE)
    trainer.compute_metrics = lambda p: {"accuracy": next(accuracies)}
    trainer.train()
    selection = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StageSelection))
    assert [(name, step) for name, step, _ in selection.history] == [
        ("dictionary", 4), ("dictionary", 8), ("dictionary", 12), ("srm", 16), ("srm", 20), ("srm", 24),
        ("kd", 28), ("kd", 32), ("kd", 36)]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # stage 1 ended with its epoch-2 dictionary (step 8), stage 2 with its epoch-1 student and heads (step 16)
    assert same(snapshots["start 12"]["coders"], snapshots[8]["coders"])
    assert not same(snapshots[12]["coders"], snapshots[8]["coders"])
    assert same(snapshots["start 24"]["student"], snapshots[16]["student"])
    assert same(snapshots["start 24"]["heads"], snapshots[16]["heads"])
    # the last stage: the epoch with the best validation accuracy (step 32) is the student kept
    final = {k: v for k, v in trainer.distill_model.student.state_dict().items()}
    assert same(final, snapshots[32]["student"]) and not same(final, snapshots[36]["student"])


def test_validation_loss_is_the_stage_loss_on_the_eval_split(tmp_path):
    from srm_hf.reference import StageSelection

    trainer = make_trainer(tmp_path, **REFERENCE)
    selection = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StageSelection))
    trainer.create_optimizer()
    trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    srm = trainer.plan.stages[1]
    model = trainer.distill_model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            out = model(pixel_values=batch["pixel_values"], labels=batch["labels"], stage=srm,
                        teacher=trainer.teacher_forward(batch))
            total, count = total + float(out.loss) * len(batch["labels"]), count + len(batch["labels"])
    model.train()
    assert selection.validation_loss(srm) == pytest.approx(total / count, rel=1e-5)
    assert trainer.model.training  # put back in training mode


def test_selection_every_eval_steps(tmp_path, monkeypatch):
    from srm_hf.reference import StageSelection

    monkeypatch.setattr(StageSelection, "score", lambda self, stage: 1.0)
    trainer = make_trainer(tmp_path, **{**REFERENCE, "eval_strategy": "steps", "eval_steps": 6})
    trainer.train()
    selection = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StageSelection))
    assert [(name, step) for name, step, _ in selection.history] == [
        ("dictionary", 6), ("dictionary", 12), ("srm", 18), ("srm", 24), ("kd", 30), ("kd", 36)]


@pytest.mark.parametrize("preset, clip", [("reference", float("inf")), ("trainer", 1.0)])
def test_reference_preset_never_clips(tmp_path, preset, clip):
    config = {"preset": "reference", "eval_strategy": "epoch"} if preset == "reference" else {}
    trainer = make_trainer(tmp_path, method="kd", max_steps=3, **config)
    norms = []
    original = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda params, max_norm, **kw: norms.append(max_norm) or original(
        params, max_norm, **kw)
    trainer.train()
    assert norms and set(norms) == {clip}  # inf: the norm is measured (for the NaN guard), nothing is scaled


def test_a_stage_run_alone_keeps_its_own_schedule_and_criterion_and_eval_on_start_is_no_candidate(tmp_path):
    from srm_hf.reference import StageSelection

    # train_stages(["dictionary"]): the dictionary is the plan's last stage but not the method's final one, so it keeps
    # its 10/60/30 drops (steps 1 and 8 of 12) and its lowest-training-loss epochs, as inside train()
    alone = make_trainer(tmp_path / "a", **{**REFERENCE, "max_steps": 1, "srm_max_steps": 1}, learning_rate=1e-3)
    alone.train_stages(["dictionary"])
    rates = [e["learning_rate"] for e in alone.state.log_history if "loss" in e]
    assert rates == pytest.approx([1e-3] + [1e-4] * 7 + [1e-5] * 4)
    selection = next(cb for cb in alone.callback_handler.callbacks if isinstance(cb, StageSelection))
    assert [(name, step) for name, step, _ in selection.history] == [("dictionary", 4), ("dictionary", 8),
                                                                      ("dictionary", 12)]
    # eval_on_start scores the untrained student: no candidate, or a metric best there would put it back
    kd = make_trainer(tmp_path / "b", method="kd", preset="reference", eval_strategy="epoch", eval_on_start=True,
                      max_steps=-1, num_train_epochs=2)
    falling = iter([1.0, 0.5, 0.25])
    kd.compute_metrics = lambda p: {"accuracy": next(falling)}
    untrained = {k: v.clone() for k, v in kd.distill_model.student.state_dict().items()}
    kd.train()
    selection = next(cb for cb in kd.callback_handler.callbacks if isinstance(cb, StageSelection))
    assert [step for _, step, _ in selection.history] == [4, 8]
    assert not all(torch.equal(v, untrained[k]) for k, v in kd.distill_model.student.state_dict().items())
