"""Methods as units: a method written here trains through the public API, DKD and ReviewKD train with their extras
kept out of the exported student, and every stage of every method resumes exactly."""

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import PatternDataset, changed, hf_resnet, make_config, make_trainer, snapshot, timm_resnet

from srm_hf import DistillationTrainer, Method, StageSpec
from srm_hf.methods import SRM


class FeatureMSE(Method):
    """A trivial feature method: each student tap, projected to the teacher's channels, regresses the teacher's."""

    name = "feature_mse"
    uses_taps = True

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight
        self.proj = nn.ModuleDict()

    def build(self, pairs):
        super().build(pairs)
        for p in pairs:
            self.proj[p.key] = nn.Conv2d(p.student.channels, p.teacher.channels, 1) if p.teacher.spatial else \
                nn.Linear(p.student.channels, p.teacher.channels)

    def stages(self):
        return [StageSpec("mse", trains=("student", "proj"))]

    def loss(self, stage, student, teacher, labels):
        mse = sum(F.mse_loss(self.proj[k](student.features[k]), t) for k, t in teacher.features.items())
        return {"mse": self.weight * mse, "ce": F.cross_entropy(student.logits, labels)}


@pytest.mark.parametrize("stages, match", [
    ([StageSpec("warmup"), StageSpec("mse")], r"every stage but the last needs its own epochs.*\['warmup'\]"),
    ([StageSpec("mse", epochs=2)], "the last none.*'mse' has epochs=2"),
])
def test_stages_of_unclear_length_are_refused_when_the_trainer_is_built(tmp_path, stages, match):
    # the last stage is the one the run sizes and evaluates: it must be one, and only one
    method = FeatureMSE()
    method.stages = lambda: stages
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=method,
                            args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))


def saved_student_keys(folder) -> set[str]:
    return set(safetensors.torch.load_file(os.path.join(folder, "model.safetensors")))


def test_a_method_defined_here_trains_with_no_change_to_the_library(tmp_path):
    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=FeatureMSE(weight=0.5),
                                  args=make_config(tmp_path, method="kd", max_steps=3), train_dataset=PatternDataset(32))
    before = snapshot(trainer.distill_model)
    trainer.train()
    after = snapshot(trainer.distill_model)
    assert [s.name for s in trainer.plan.stages] == ["mse"] and len(trainer.tap_pairs) == 4
    assert changed(before, after, "student.") and changed(before, after, "method.proj.")
    logged = {k for e in trainer.state.log_history for k in e if "/" in k}
    assert logged == {"mse/mse", "mse/ce"}
    trainer.save_model()
    assert not any("proj" in k for k in saved_student_keys(tmp_path / "out"))


def test_the_readmes_method_trains_as_written(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Customise", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(block.split("\ntrainer = ", 1)[0], namespace)  # all but its last line, which elides the data
    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=namespace["FeatureMSE"](),
                                  args=make_config(tmp_path, method="kd", max_steps=2),
                                  train_dataset=PatternDataset(16))
    trainer.train()  # automatic pairs: three maps and the pooled vector
    assert len(trainer.tap_pairs) == 4 and any("mse/mse" in e for e in trainer.state.log_history)


def test_a_method_instance_refuses_fields_of_named_methods(tmp_path):
    with pytest.raises(ValueError, match="kd_alpha=0.9 .*'feature_mse'"):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=FeatureMSE(),
                            args=make_config(tmp_path, method="kd", kd_alpha=0.9), train_dataset=PatternDataset(8))


def test_a_stage_that_trains_a_missing_module_is_refused(tmp_path):
    class Typo(FeatureMSE):
        def stages(self):
            return [StageSpec("mse", trains=("student", "projs"))]

    with pytest.raises(ValueError, match=r"trains \('student', 'projs'\).*'proj'"):  # when built: before any compute
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=Typo(),
                            args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))


class Forgotten(FeatureMSE):
    """FeatureMSE whose only stage forgets its projections: they would keep their initial weights."""

    def stages(self):
        return [StageSpec("mse", trains=("student",))]


def test_a_trainable_method_module_that_no_stage_trains_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"Method 'feature_mse': its module 'proj' has 8 trainable parameters "
                                         r"\(e\.g\. 'method\.proj\.[\w.]+'\) that none of its stages \['mse'\] "
                                         r"trains.*Add 'proj' to the `trains`.*self\.proj\.requires_grad_\(False\)"):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=Forgotten(),
                            args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))


def test_a_module_fixed_by_design_is_frozen_by_the_method_and_kept(tmp_path):
    class Fixed(Forgotten):
        def build(self, pairs):
            super().build(pairs)
            self.proj.requires_grad_(False)  # fixed projections, decided by the method: no stage trains them

    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=Fixed(), train_dataset=
                                  PatternDataset(16), args=make_config(tmp_path, method="kd", max_steps=2))
    before = snapshot(trainer.distill_model)
    trainer.train()
    after = snapshot(trainer.distill_model)
    assert changed(before, after, "student.") and not changed(before, after, "method.proj.")
    assert {g["stage_group"] for g in trainer.optimizer.param_groups} == {"student"}  # nothing of 'proj' held
    trainer.save_model()
    state = safetensors.torch.load_file(tmp_path / "out" / "method_state.safetensors")
    assert all(torch.equal(state[k], before[k]) for k in before if k.startswith("method.proj."))


def test_a_module_only_earlier_stages_train_passes_whatever_train_stages_runs(tmp_path):
    class Hinted(FeatureMSE):  # 'proj' trained by the first stage only, as FitNet's regressors
        def stages(self):
            return [StageSpec("hint", trains=("student", "proj"), max_steps=1), StageSpec("ce", trains=("student",))]

    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=Hinted(), train_dataset=
                                  PatternDataset(8), args=make_config(tmp_path, method="kd", max_steps=1))
    trainer.train_stages(["hint"])
    trainer.train_stages(["ce"])  # a plan without 'hint': judged on the method's stages, not refused



@pytest.mark.parametrize("method, terms, extras", [("dkd", {"dkd/dkd", "dkd/ce"}, None),
                                                   ("reviewkd", {"reviewkd/review", "reviewkd/ce"}, "abfs")])
def test_dkd_and_reviewkd_train_a_transformers_student_from_a_timm_teacher(tmp_path, method, terms, extras):
    trainer = make_trainer(tmp_path, method=method, max_steps=4, **{f"{method}_warmup_ratio": 0.5})
    before = snapshot(trainer.distill_model)
    trainer.train()
    after = snapshot(trainer.distill_model)
    assert changed(before, after, "student.resnet.") and changed(before, after, "student.classifier.")
    assert {k for e in trainer.state.log_history for k in e if "/" in k} == terms
    trainer.save_model()
    student_keys = saved_student_keys(tmp_path / "out")
    assert student_keys == set(trainer.distill_model.student.state_dict())  # the student alone
    if extras:
        assert changed(before, after, f"method.{extras}.")
        state = safetensors.torch.load_file(tmp_path / "out" / "method_state.safetensors")
        assert state and all(k.startswith(f"method.{extras}.") for k in state)


# Every method, with every stage two steps long; resuming from a checkpoint after the first step of each stage
# must end with the weights of the uninterrupted run.
STAGED = {
    "srm paper": dict(method="srm", srm_dictionary_max_steps=2, srm_max_steps=2),
    "srm joint": dict(method="srm", srm_mode="joint", srm_dictionary_max_steps=2),
    "kd": dict(method="kd"), "dkd": dict(method="dkd"), "at": dict(method="at"), "alone": dict(method="alone"),
    "fitnet": dict(method="fitnet", fitnet_max_steps=2), "reviewkd": dict(method="reviewkd"),
}


@pytest.mark.parametrize("name", list(STAGED))
def test_resume_inside_every_stage_matches_an_uninterrupted_run(tmp_path, name):
    config = dict(STAGED[name], max_steps=2, save_strategy="steps", save_steps=1)
    full = make_trainer(tmp_path / "full", **config)
    full.train()
    final = full.distill_model.state_dict()
    for stage in full.plan.stages:
        checkpoint = tmp_path / "full" / "out" / f"checkpoint-{stage.start + 1}"  # one step into the stage
        resumed = make_trainer(tmp_path / f"resumed{stage.index}", student=hf_resnet(seed=7), **config)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == full.plan.total_steps
        state = resumed.distill_model.state_dict()
        for k, v in final.items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=f"{name}, stage {stage.name}: {k}")


@pytest.mark.parametrize("method", ["srm", "kd", "fitnet"])
def test_a_kd_stage_with_alpha_zero_trains_on_labels_without_running_the_teacher(tmp_path, method):
    extra = {"fitnet_max_steps": 2} if method == "fitnet" else {}
    trainer = make_trainer(tmp_path, method=method, kd_alpha=0.0, **extra)
    calls = []
    trainer.teacher_forward = lambda inputs, forward=trainer.teacher_forward: calls.append(1) or forward(inputs)
    trainer.train()
    kd_steps = trainer.plan.stages[-1].steps
    assert trainer.plan.stages[-1].name == "kd" and not trainer.plan.stages[-1].spec.uses_teacher
    assert len(calls) == trainer.state.global_step - kd_steps  # the earlier stages only
    logged = {k for e in trainer.state.log_history for k in e if k.startswith("kd/")}
    assert logged == {"kd/ce"}


class PooledTargets(FeatureMSE):
    """FeatureMSE that keeps only the teacher's pooled maps, in `prepare_teacher`, and records when it ran."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def prepare_teacher(self, stage, teacher):
        self.calls.append("prepare_teacher")
        teacher.targets = {k: t.mean(dim=(2, 3)) if t.dim() == 4 else t for k, t in teacher.features.items()}
        teacher.features = {}

    def loss(self, stage, student, teacher, labels):
        assert not teacher.features  # reduced before the loss
        pooled = {k: s.mean(dim=(2, 3)) if s.dim() == 4 else s for k, s in student.features.items()}
        return {"mse": sum(F.mse_loss(pooled[k][:, :t.shape[1]], t[:, :pooled[k].shape[1]])
                           for k, t in teacher.targets.items())}


def test_prepare_teacher_runs_before_the_student_in_every_step(tmp_path):
    method = PooledTargets()
    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=method,
                                  args=make_config(tmp_path, method="kd", max_steps=3), train_dataset=PatternDataset(32))
    trainer.distill_model.student.register_forward_pre_hook(lambda *_: method.calls.append("student"))
    trainer.train()
    assert method.calls == ["prepare_teacher", "student"] * 3


def test_srm_labels_taken_before_the_student_equal_those_taken_in_the_loss(tmp_path):
    """SRM's `prepare_teacher` replaces the teacher's maps by the labels; the loss terms are those of the maps."""
    from srm_hf.methods import Features

    trainer = make_trainer(tmp_path, srm_mode="joint", srm_dictionary_max_steps=1, max_steps=1)
    trainer.train()
    model, stage = trainer.distill_model, trainer.plan.stages[-1]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        teacher = trainer.teacher_forward(batch)
        late = Features(teacher.logits, dict(teacher.features))
        out = model(pixel_values=batch["pixel_values"], labels=batch["labels"], stage=stage, teacher=teacher)
        assert not teacher.features and set(teacher.targets) == set(late.features)
        with model.student_hooks.capturing():
            model.student(batch["pixel_values"])  # the same student maps again (same weights, same batch)
        student = Features(out.logits, model.student_hooks.pop())
        want = model.method.loss(stage, student, late, batch["labels"])
    for name, value in want.items():
        torch.testing.assert_close(out.terms[name], value, rtol=1e-6, atol=1e-7, msg=name)


class TapWeightedSRM(SRM):
    """`tap_loss` overridden, as the method's docstring offers: the deepest tap counts twice, and each tap adds a term
    named like one of KD's."""

    def tap_loss(self, pair, head_logits, pixel_labels, image_labels):
        terms = super().tap_loss(pair, head_logits, pixel_labels, image_labels)
        scale = 2.0 if pair is self.pairs[-1] else 1.0
        return {**{k: scale * v for k, v in terms.items()}, "ce": head_logits.float().pow(2).mean()}


def test_an_overridden_tap_loss_adds_its_terms_to_the_joint_stage(tmp_path):
    """Per term: the sum over taps of what `tap_loss` returns, times `srm_weight`, added to a KD term of that name."""
    from srm_hf.methods import Features
    from srm_hf.methods.kd import kd_terms

    method = TapWeightedSRM(mode="joint", weight=0.5, dictionary_max_steps=1)
    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=method,
                                  args=make_config(tmp_path, srm_mode="joint", max_steps=1),
                                  train_dataset=PatternDataset(32))
    trainer.train()
    model, stage = trainer.distill_model, trainer.plan.stages[-1]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        teacher = trainer.teacher_forward(batch)
        out = model(pixel_values=batch["pixel_values"], labels=batch["labels"], stage=stage, teacher=teacher)
        with model.student_hooks.capturing():
            model.student(batch["pixel_values"])  # the same student maps again (same weights, same batch)
        student = Features(out.logits, model.student_hooks.pop())
        kd = kd_terms(out.logits, teacher, batch["labels"], method.kd_alpha, method.kd_temperature,
                      method.label_smoothing)
        per_tap = [method.tap_loss(p, method.head_logits(p, student.features[p.key]), *teacher.targets[p.key])
                   for p in method.pairs]
    assert stage.name == "joint" and len(per_tap) > 1
    for name in ("pixel", "image"):
        torch.testing.assert_close(out.terms[name], 0.5 * sum(t[name] for t in per_tap), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.terms["kd"], kd["kd"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.terms["ce"], kd["ce"] + 0.5 * sum(t["ce"] for t in per_tap), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("method", ["fitnet", "at"])
def test_methods_that_compare_positions_refuse_pairs_of_other_grids_when_built(tmp_path, method):
    extra = {"fitnet_max_steps": 2} if method == "fitnet" else {}
    with pytest.raises(ValueError, match=f"Method '{method}' compares features position by position.*'layer1:"
                                         "resnet.encoder.stages.1'"):  # an 8x8 map against a 4x4 one
        make_trainer(tmp_path, method=method, layer_pairs=["layer1:resnet.encoder.stages.1"], allow_resize=True,
                     **extra)


def test_attention_transfer_over_pooled_vectors_alone_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'at' transfers spatial attention.*pooled vector.*its term would be 0"):
        make_trainer(tmp_path, method="at", layer_pairs=["global_pool:classifier.0"])


def test_a_codeword_multiplier_that_leaves_one_atom_is_refused_naming_the_tap(tmp_path):
    with pytest.raises(ValueError, match=r"srm_codeword_multiplier=0.05 gives the tap layer1: 32x8x8.*1 atom.*m >= "):
        make_trainer(tmp_path, srm_codeword_multiplier=0.05)


def test_reviewkd_refuses_pairs_listed_deep_to_shallow(tmp_path):
    pairs = ["layer1:resnet.encoder.stages.0", "layer2:resnet.encoder.stages.1"]
    with pytest.raises(ValueError, match="not listed shallow to deep"):
        make_trainer(tmp_path, method="reviewkd", layer_pairs=pairs[::-1])
    assert [p.key for p in make_trainer(tmp_path, method="reviewkd", layer_pairs=pairs).method.pairs] == \
        ["layer1", "layer2"]
