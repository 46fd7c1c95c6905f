"""Mixed precision on the CPU, non-finite steps, and a compiled student."""

import math

import pytest
import torch
from conftest import changed, make_trainer, snapshot

from srm_hf import SRM, DistillationTrainer


class ProbeSRM(SRM):
    """SRM that records the precision of its targets and of every loss term."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {}

    def targets(self, teacher_features):
        targets = super().targets(teacher_features)
        self.seen["image_targets"] = next(iter(targets.values()))[1].dtype
        return targets

    def loss(self, stage, student, teacher, labels):
        terms = super().loss(stage, student, teacher, labels)
        self.seen.update({k: v.dtype for k, v in terms.items()})
        return terms


class DtypeProbe(DistillationTrainer):
    """Records the precision of what the teacher and the student's hooks produce and of every loss term."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, method=ProbeSRM.from_config(kwargs["args"]), **kwargs)
        self.seen = self.method.seen
        layer = self.distill_model.student.get_submodule(self.tap_pairs[0].student.path)
        layer.register_forward_hook(lambda m, a, out: self.seen.__setitem__("student_features", out.dtype))

    def teacher_forward(self, inputs):
        teacher = super().teacher_forward(inputs)
        self.seen["teacher_features"] = next(iter(teacher.features.values())).dtype
        return teacher


def test_bf16_autocast_with_float32_targets_and_losses(tmp_path):
    from conftest import PatternDataset, hf_resnet, make_config, timm_resnet

    trainer = DtypeProbe(model=hf_resnet(), teacher_model=timm_resnet(), train_dataset=PatternDataset(32),
                         args=make_config(tmp_path, srm_mode="joint", bf16=True, srm_dictionary_max_steps=2, max_steps=3))
    trainer.train()
    seen = trainer.seen
    assert seen["teacher_features"] == torch.bfloat16 and seen["student_features"] == torch.bfloat16  # autocast
    assert seen["image_targets"] == torch.float32
    assert all(seen[k] == torch.float32 for k in ("kd", "ce", "pixel", "image"))
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if "/" in k or k == "loss":
                assert math.isfinite(v), (k, v)
    assert all(p.dtype == torch.float32 for p in trainer.distill_model.parameters())  # master weights stay fp32


class NaNAtStep(SRM):
    """SRM whose KD term is NaN at one optimizer step (1-based)."""

    bad_step = 5

    def loss(self, stage, student, teacher, labels):
        terms = super().loss(stage, student, teacher, labels)
        if stage.start + stage.step + 1 == self.bad_step:
            terms["kd"] = terms["kd"] * float("nan")
        return terms


def nan_trainer(tmp_path, **config):
    from conftest import PatternDataset, hf_resnet, make_config, timm_resnet

    args = make_config(tmp_path, srm_mode="joint", srm_dictionary_max_steps=2, max_steps=4, **config)
    return DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), train_dataset=PatternDataset(32),
                               args=args, method=NaNAtStep.from_config(args))


SKIP_PATHS = pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])  # skipped on the device / host


def test_the_skip_runs_on_the_device_for_fused_adam_alone():
    from srm_hf.nonfinite import skips_on_device

    params, norm = [torch.nn.Parameter(torch.ones(3))], torch.tensor(1.0)
    assert skips_on_device(torch.optim.AdamW(params, fused=True), norm)
    assert skips_on_device(torch.optim.Adagrad(params, fused=True), norm)
    assert not skips_on_device(torch.optim.AdamW(params), norm)  # no found_inf: the host reads the norm
    assert not skips_on_device(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True), norm)  # see nonfinite.py
    assert not skips_on_device(torch.optim.AdamW(params, fused=True), 1.0)  # DeepSpeed's norm is a float


@SKIP_PATHS
def test_a_nonfinite_step_is_skipped_and_logged(tmp_path, optim):
    trainer = nan_trainer(tmp_path, optim=optim)
    on_device = []  # whether the optimizer was handed a found_inf flag, per step
    trainer.add_callback(type("Flag", (__import__("transformers").TrainerCallback,), {
        "on_pre_optimizer_step": lambda self, args, state, control, **kw: on_device.append(
            hasattr(trainer.optimizer.optimizer, "found_inf"))})())
    states = {}
    trainer.add_callback(type("Snap", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: states.__setitem__(
            state.global_step, {n: p.detach().clone() for n, p in trainer.distill_model.named_parameters()})})())
    trainer.train()
    assert not changed(states[4], states[5])  # the NaN step changed no parameter
    assert changed(states[5], states[6])  # and training went on
    assert all(torch.isfinite(v).all() for v in states[6].values() if v.is_floating_point())
    skipped = [e["nonfinite_steps_skipped"] for e in trainer.state.log_history if "nonfinite_steps_skipped" in e]
    assert skipped == [0, 0, 0, 0, 1, 1]
    assert on_device == [optim == "adamw_torch_fused"] * 6
    assert not hasattr(trainer.optimizer.optimizer, "found_inf")  # removed after each step


def test_a_skipped_step_drops_out_of_its_log_windows_means_and_stays_counted_after_resuming(tmp_path):
    # logging_steps=2: the window of steps 5-6 averages step 6's terms alone (step 5's KD term is NaN, skipped)
    trainer = nan_trainer(tmp_path, logging_steps=2, save_strategy="steps", save_steps=5)
    trainer.train()
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert math.isfinite(logs[6]["joint/kd"]) and logs[6]["nonfinite_steps_skipped"] == 1
    resumed = nan_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    assert [e["nonfinite_steps_skipped"] for e in resumed.state.log_history if "loss" in e][-1] == 1


@SKIP_PATHS
def test_too_many_nonfinite_steps_stop_with_a_clear_error(tmp_path, optim):
    trainer = nan_trainer(tmp_path, max_nonfinite_steps=0, optim=optim)
    with pytest.raises(FloatingPointError, match="NaN/inf gradients.*stage 'joint', step 5.*learning rate"):
        trainer.train()


def test_compiled_student_keeps_its_taps(tmp_path):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    trainer = make_trainer(tmp_path, srm_mode="joint", compile_student=True, torch_compile_backend="aot_eager",
                           srm_dictionary_max_steps=1, max_steps=2)
    before = snapshot(trainer.distill_model)
    trainer.train()
    after = snapshot(trainer.distill_model)
    assert counters["stats"]["unique_graphs"] > 0  # the student really ran compiled
    assert changed(before, after, "method.heads.") and changed(before, after, "student.")  # its taps fed the heads
    assert not any(k.startswith("student._orig_mod") for k in after)  # export keys unchanged
    torch._dynamo.reset()


def test_a_compiled_teacher_gives_the_same_targets_and_run(tmp_path):
    """compile_teacher: the teacher runs compiled, its taps still feed the SRM targets, and the run equals an
    uncompiled one (aot_eager traces the same arithmetic)."""
    torch._dynamo.reset()
    from accelerate.utils import is_compiled_module
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        counters.clear()
        trainer = make_trainer(tmp_path / str(compiled), srm_mode="joint", compile_teacher=compiled,
                               torch_compile_backend="aot_eager" if compiled else None, srm_dictionary_max_steps=2,
                               max_steps=4)
        trainer.train()
        assert (counters["stats"]["unique_graphs"] > 0) == compiled
        assert not is_compiled_module(trainer.model_wrapped)  # the models in place; Accelerate compiles no wrapper
        assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
        runs[compiled] = snapshot(trainer.distill_model)
    for name, value in runs[False].items():
        torch.testing.assert_close(runs[True][name], value, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_compiled_models_keep_their_taps_after_a_run_without_taps_in_the_same_process(tmp_path):
    """A KD run compiles student and teacher without hooks; an SRM run then compiles new instances of the same
    classes with hooks: Dynamo must not reuse the hook-less code for them (their taps would capture nothing)."""
    torch._dynamo.reset()
    compiled = dict(compile_student=True, compile_teacher=True, torch_compile_backend="aot_eager")
    make_trainer(tmp_path / "kd", method="kd", max_steps=2, **compiled).train()
    trainer = make_trainer(tmp_path / "srm", srm_mode="joint", srm_dictionary_max_steps=1, max_steps=2, **compiled)
    before = snapshot(trainer.distill_model)
    trainer.train()
    assert changed(before, snapshot(trainer.distill_model), "method.heads.")  # both sides' taps fed the SRM loss
    torch._dynamo.reset()


def poisoned_trainer(tmp_path, optim, **config):
    """A joint SRM run (2 + 2 steps) whose student's first tapped stage outputs one NaN at optimizer step 4, so that
    the BatchNorm after it records NaN statistics in that step's forward; `states[step]` snapshots the model."""
    from conftest import PatternDataset, hf_resnet, make_config, timm_resnet

    args = make_config(tmp_path, srm_mode="joint", srm_dictionary_max_steps=2, max_steps=4, optim=optim, **config)
    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), train_dataset=PatternDataset(32),
                                  args=args, method=SRM.from_config(args))

    def poison(module, inputs, output):  # the student's first stage, at optimizer step 4 (its forward)
        if trainer.model.training and trainer.state.global_step == 3:
            output = output.clone()
            output[0, 0, 0, 0] = float("nan")
            return output

    trainer.distill_model.student.get_submodule(trainer.tap_pairs[0].student.path).register_forward_hook(poison)
    states = {}
    trainer.add_callback(type("Snap", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: states.__setitem__(
            state.global_step, snapshot(trainer.distill_model))})())
    return trainer, states


@SKIP_PATHS
def test_a_skipped_step_leaves_no_trace_in_batchnorm(tmp_path, optim):
    """One NaN in one student feature map: the step is skipped and the BatchNorm statistics it wrote are undone."""
    trainer, states = poisoned_trainer(tmp_path, optim)
    trainer.train()
    assert [e["nonfinite_steps_skipped"] for e in trainer.state.log_history if "loss" in e] == [0, 0, 0, 1, 1, 1]
    bn = [k for k in states[3] if "running_" in k or "num_batches_tracked" in k]
    assert bn and all(torch.equal(states[3][k], states[4][k]) for k in states[3])  # nothing moved, buffers included
    assert changed(states[4], states[6], "student.")
    assert all(torch.isfinite(v).all() for v in states[6].values() if v.is_floating_point())


@SKIP_PATHS
def test_a_run_stopped_by_nonfinite_steps_keeps_its_model_as_before_them_and_saves_it(tmp_path, optim):
    trainer, states = poisoned_trainer(tmp_path, optim, max_nonfinite_steps=0)
    with pytest.raises(FloatingPointError, match="step 4.*model in memory is as it was before these steps"):
        trainer.train()
    now = snapshot(trainer.distill_model)
    assert all(torch.equal(states[3][k], now[k]) for k in now)  # weights and BatchNorm statistics of step 3
    trainer.save_model()  # refused when a buffer holds NaN: the run's training would be lost
    assert (tmp_path / "out" / "model.safetensors").is_file()


def under_fp16_scaler(trainer, monkeypatch):
    """What accelerate sets up for fp16 on a GPU, on the CPU: fp16 autocast and a gradient scaler, which unscales
    the gradients before their norm and skips the optimizer step itself when they are not finite."""
    accelerator = trainer.accelerator
    monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu"))
    monkeypatch.setattr(accelerator, "native_amp", True)
    monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")  # a shared state: put back after the test
    return trainer


@SKIP_PATHS
def test_under_fp16s_scaler_a_skipped_step_is_counted_and_leaves_no_trace_in_batchnorm(tmp_path, optim, monkeypatch):
    """The scaler skips the NaN step's update, but not the BatchNorm statistics its forward wrote: put back, or the
    saved student would be refused (NaN buffers) and the run lost."""
    trainer, states = poisoned_trainer(tmp_path, optim)
    under_fp16_scaler(trainer, monkeypatch).train()
    assert trainer.accelerator.scaler.get_scale() < 2.0 ** 16  # the scaler saw the NaN step
    assert [e["nonfinite_steps_skipped"] for e in trainer.state.log_history if "loss" in e] == [0, 0, 0, 1, 1, 1]
    assert all(torch.equal(states[3][k], states[4][k]) for k in states[3])  # nothing moved, buffers included
    assert changed(states[4], states[6], "student.")
    trainer.save_model()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_under_fp16s_scaler_too_many_skipped_steps_stop_with_the_model_as_before_them(tmp_path, monkeypatch):
    trainer, states = poisoned_trainer(tmp_path, "adamw_torch_fused", max_nonfinite_steps=0)
    with pytest.raises(FloatingPointError, match="step 4.*model in memory is as it was before these steps"):
        under_fp16_scaler(trainer, monkeypatch).train()
    now = snapshot(trainer.distill_model)
    assert all(torch.equal(states[3][k], now[k]) for k in now)
