"""Stages, frozen teacher, logged terms, joint mode, evaluation."""

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import PatternDataset, changed, hf_resnet, make_trainer, pretrain_dictionary, snapshot, timm_resnet
from transformers import TrainerCallback

from srm_hf.srm import dictionary_loss


class StageSnapshots(TrainerCallback):
    """Student-side state at the start and at the end of every stage; the teacher checked after every step."""

    def __init__(self):
        self.trainer, self.states, self.teacher_states = None, {}, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.states[state.global_step] = snapshot(self.trainer.distill_model)
        self.teacher_before = snapshot(self.trainer.teacher)

    def on_step_end(self, args, state, control, **kwargs):
        if any(state.global_step == s.end for s in self.trainer.plan.stages):
            self.states[state.global_step] = snapshot(self.trainer.distill_model)
        self.teacher_states.append(snapshot(self.trainer.teacher))
        assert not self.trainer.teacher.training


def run_with_snapshots(tmp_path, **config):
    snaps = StageSnapshots()
    trainer = make_trainer(tmp_path, callbacks=[snaps], **config)
    snaps.trainer = trainer
    trainer.train()
    return trainer, snaps


def logged(trainer, name):
    return [(e["step"], e[name]) for e in trainer.state.log_history if name in e]


def test_stage1_lowers_reconstruction_error(tmp_path):
    trainer = make_trainer(tmp_path, srm_dictionary_max_steps=30, srm_dictionary_learning_rate=1e-2)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])

    def error():
        feats = trainer.teacher_forward(batch).features
        coders = trainer.distill_model.method.coders
        with torch.no_grad():
            return sum(dictionary_loss(f, coders[k](f)[1]) for k, f in feats.items()).item()

    before = error()
    teacher_before = snapshot(trainer.teacher)
    student_before = snapshot(trainer.distill_model)
    pretrain_dictionary(trainer)
    assert error() < 0.8 * before
    after = snapshot(trainer.distill_model)
    assert changed(student_before, after, "method.coders.")
    assert not changed(student_before, after, "student.") and not changed(student_before, after, "method.heads.")
    assert all(torch.equal(v, snapshot(trainer.teacher)[k]) for k, v in teacher_before.items())
    assert (tmp_path / "out" / "srm_dictionary.safetensors").is_file()


def test_paper_mode_stages(tmp_path):
    trainer, snaps = run_with_snapshots(tmp_path, srm_mode="paper")
    assert [s.name for s in trainer.plan.stages] == ["dictionary", "srm", "kd"]
    s0, s1, s2, s3 = (snaps.states[k] for k in (0, 4, 8, 12))
    # stage 1: only the dictionaries move
    assert changed(s0, s1, "method.coders.") and not changed(s0, s1, "student.") and not changed(s0, s1, "method.heads.")
    # stage 2: student backbone and heads move, not the dictionary nor the student's classifier
    assert changed(s1, s2, "student.resnet.") and changed(s1, s2, "method.heads.")
    assert not changed(s1, s2, "method.coders.") and not changed(s1, s2, "student.classifier.")
    # stage 3: KD trains the whole student and nothing else
    assert changed(s2, s3, "student.classifier.") and changed(s2, s3, "student.resnet.")
    assert not changed(s2, s3, "method.heads.") and not changed(s2, s3, "method.coders.")
    # the teacher, BatchNorm buffers included, is bit-identical after every step of every stage
    assert len(snaps.teacher_states) == 12
    for state in snaps.teacher_states:
        assert all(torch.equal(state[k], v) for k, v in snaps.teacher_before.items())
    # each stage's terms under its own names, at its own steps
    assert [s for s, _ in logged(trainer, "dictionary/mse")] == [1, 2, 3, 4]
    assert [s for s, _ in logged(trainer, "srm/pixel")] == [5, 6, 7, 8]
    assert [s for s, _ in logged(trainer, "srm/image")] == [5, 6, 7, 8]
    assert [s for s, _ in logged(trainer, "kd/kd")] == [9, 10, 11, 12]
    assert [s for s, _ in logged(trainer, "kd/ce")] == [9, 10, 11, 12]
    assert [v for _, v in logged(trainer, "stage")] == [1] * 4 + [2] * 4 + [3] * 4
    for step, loss in logged(trainer, "loss"):
        entry = next(e for e in trainer.state.log_history if e.get("step") == step and "loss" in e)
        terms = [v for k, v in entry.items() if "/" in k]
        assert abs(sum(terms) - loss) < 1e-4 * max(1.0, abs(loss))


def test_joint_mode_trains_all_terms_at_once(tmp_path):
    trainer, snaps = run_with_snapshots(tmp_path, srm_mode="joint", srm_weight=0.5)
    assert [s.name for s in trainer.plan.stages] == ["dictionary", "joint"]
    s1, s2 = snaps.states[4], snaps.states[8]
    assert changed(s1, s2, "student.classifier.") and changed(s1, s2, "student.resnet.") and changed(s1, s2, "method.heads.")
    assert not changed(s1, s2, "method.coders.")
    for name in ("joint/kd", "joint/ce", "joint/pixel", "joint/image"):
        assert [s for s, _ in logged(trainer, name)] == [5, 6, 7, 8], name
    for state in snaps.teacher_states:
        assert all(torch.equal(state[k], v) for k, v in snaps.teacher_before.items())


def test_srm_weight_and_target_choice(tmp_path):
    trainer = make_trainer(tmp_path, srm_mode="joint", srm_targets="image", srm_weight=0.0, srm_dictionary_max_steps=1,
                           max_steps=1)
    trainer.train()
    assert logged(trainer, "joint/image")[0][1] == 0.0
    assert not logged(trainer, "joint/pixel")


def test_per_stage_learning_rates(tmp_path):
    trainer = make_trainer(tmp_path, srm_dictionary_learning_rate=5e-3, learning_rate=2e-3, lr_scheduler_type="constant")
    trainer.train()
    lrs = [v for _, v in logged(trainer, "learning_rate")]
    assert lrs == [5e-3] * 4 + [2e-3] * 8


def test_eval_compute_metrics_and_accumulation(tmp_path):
    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = make_trainer(tmp_path, eval_strategy="steps", eval_steps=4, gradient_accumulation_steps=2,
                           srm_dictionary_max_steps=2, srm_max_steps=2, max_steps=2)
    trainer.compute_metrics = accuracy
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    assert evals and 0.0 <= evals[-1]["eval_accuracy"] <= 1.0 and "eval_loss" in evals[-1]
    assert trainer.state.global_step == 6  # stage lengths count optimizer steps


def test_dictionary_is_skipped_when_loaded(tmp_path):
    first = make_trainer(tmp_path / "a")
    pretrain_dictionary(first)
    path = tmp_path / "a" / "out" / "srm_dictionary.safetensors"
    second = make_trainer(tmp_path / "b", srm_dictionary_path=str(path))
    coders = {k: v for k, v in snapshot(first.distill_model).items() if k.startswith("method.coders.")}
    assert not changed(coders, snapshot(second.distill_model), "method.coders.")
    second.train()
    assert [s.name for s in second.plan.stages] == ["srm", "kd"]
    assert not logged(second, "dictionary/mse")


def test_a_loaded_dictionary_is_frozen_saved_and_changes_no_number(tmp_path):
    """The coders of a loaded dictionary are frozen (no stage trains them): out of the optimizer, saved as loaded
    in every checkpoint, and the run's numbers are those of coders left trainable (the earlier behaviour)."""
    path = pretrain_dictionary(make_trainer(tmp_path / "a", srm_dictionary_max_steps=2))
    config = dict(srm_dictionary_path=path, srm_max_steps=2, max_steps=2, save_strategy="steps", save_steps=1)
    frozen, trainable = make_trainer(tmp_path / "frozen", **config), make_trainer(tmp_path / "trainable", **config)
    coders = frozen.method.coders
    before = snapshot(frozen.distill_model)
    loaded = {k: v for k, v in before.items() if k.startswith("method.coders.")}
    assert not any(p.requires_grad for p in coders.parameters())
    trainable.method.coders.requires_grad_(True)  # in the optimizer, at learning rate 0 in every stage
    frozen.train()
    trainable.train()
    assert [g["stage_group"] for g in frozen.optimizer.param_groups] == ["student", "student", "heads"]
    assert not {id(p) for p in coders.parameters()} & {id(p) for g in frozen.optimizer.param_groups
                                                         for p in g["params"]}
    assert [e["loss"] for e in frozen.state.log_history if "loss" in e] == \
        [e["loss"] for e in trainable.state.log_history if "loss" in e]
    final = snapshot(frozen.distill_model)
    for k, v in snapshot(trainable.distill_model).items():
        assert torch.equal(final[k], v), k  # bit for bit
    assert not changed(before, final, "method.coders.") and changed(before, final, "method.heads.")
    for step in (1, 3):  # one step into each stage: the checkpoint holds the dictionary, resuming ends as uninterrupted
        folder = tmp_path / "frozen" / "out" / f"checkpoint-{step}"
        saved = safetensors.torch.load_file(folder / "method_state.safetensors")
        assert all(torch.equal(saved[k], v) for k, v in loaded.items())
        resumed = make_trainer(tmp_path / f"resumed{step}", student=hf_resnet(seed=7), **config)
        resumed.train(resume_from_checkpoint=str(folder))
        for k, v in snapshot(resumed.distill_model).items():
            torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6, msg=f"step {step}: {k}")
    again = frozen.method.save_dictionary(str(tmp_path / "again.safetensors"))  # still saved as loaded
    assert all(torch.equal(v, loaded[f"method.coders.{k}"]) for k, v in safetensors.torch.load_file(again).items())


def test_student_learns_with_kd(tmp_path):
    trainer = make_trainer(tmp_path, srm_mode="joint", srm_dictionary_max_steps=1, max_steps=40,
                           train_dataset=PatternDataset(64), learning_rate=3e-3)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


def test_stage_names_shown_in_the_progress_bar(tmp_path, capsys):
    trainer = make_trainer(tmp_path, disable_tqdm=False, srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=1)
    trainer.train()
    err = capsys.readouterr().err
    assert "stage 3/3: kd" in err


def test_a_teacher_that_user_code_switched_to_training_runs_in_eval_mode(tmp_path):
    trainer = make_trainer(tmp_path, method="kd", max_steps=2)
    trainer.teacher.train()
    before = snapshot(trainer.teacher)
    trainer.train()
    assert not trainer.teacher.training
    assert not changed(before, snapshot(trainer.teacher))  # its BatchNorm statistics untouched


@pytest.mark.parametrize("method", ["srm", "fitnet"])
def test_the_seed_draws_the_modules_the_method_builds(tmp_path, method):
    """As the Trainer seeds before `model_init`: the dictionaries, heads or regressors depend on `seed` alone, not
    on whatever the global random state was when the trainer was built."""
    def modules(seed, earlier_draws):
        student, teacher = hf_resnet(), timm_resnet()
        torch.manual_seed(earlier_draws)
        trainer = make_trainer(tmp_path, student=student, teacher=teacher, method=method, seed=seed)
        return trainer.method.state_dict()

    first, again, other = modules(0, 7), modules(0, 8), modules(1, 7)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
