"""What is saved: the student alone, loadable by its own library; resuming inside a stage."""

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from conftest import HANG_GUARD_S, hf_resnet, make_trainer, timm_resnet
from transformers import AutoModelForImageClassification


def student_logits(trainer, x):
    student = trainer.distill_model.student.eval()
    with torch.no_grad():
        out = student(x)
    return out.logits if hasattr(out, "logits") else out


def test_saved_transformers_student_reloads_with_auto_class(tmp_path):
    trainer = make_trainer(tmp_path, srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=2)
    trainer.train()
    out = tmp_path / "student"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "method_state.safetensors"} <= files
    keys = safetensors.torch.load_file(out / "model.safetensors").keys()
    assert not any(k.startswith(("student.", "method.coders.", "method.heads.", "teacher")) for k in keys)
    x = torch.randn(3, 3, 32, 32)
    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, student_logits(trainer, x))


def test_saved_timm_student_reloads_with_plain_timm_in_a_fresh_process(tmp_path):
    trainer = make_trainer(tmp_path, teacher=hf_resnet(hidden_sizes=(16, 32, 48, 64)), student=timm_resnet(),
                           srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=2)
    trainer.train()
    out = tmp_path / "student"
    trainer.save_model(str(out))
    assert json.loads((out / "config.json").read_text())["architecture"] == "test_resnet"
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, timm, torch\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        f"torch.save(m(torch.load('{tmp_path / 'x.pt'}')).detach(), '{tmp_path / 'y.pt'}')\n"
        "assert not any(k.startswith('srm_hf') for k in sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=HANG_GUARD_S)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), student_logits(trainer, x))
    # and in this process too
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), student_logits(trainer, x))


def test_resume_in_the_middle_of_stage2_matches_an_uninterrupted_run(tmp_path):
    # 4 dictionary + 4 SRM + 4 KD steps; checkpoint-6 lies inside stage 2.
    full = make_trainer(tmp_path / "full", save_strategy="steps", save_steps=6)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-6"
    assert {"model.safetensors", "method_state.safetensors", "optimizer.pt", "scheduler.pt"} <= set(os.listdir(checkpoint))

    resumed = make_trainer(tmp_path / "resumed", teacher=None, student=hf_resnet(seed=7))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 12
    steps = [e["step"] for e in resumed.state.log_history if "loss" in e]
    assert steps == list(range(1, 13))  # 1-6 restored from the checkpoint, 7-12 run: nothing re-run or skipped
    a, b = full.distill_model.state_dict(), resumed.distill_model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    full_losses = {e["step"]: e["loss"] for e in full.state.log_history if "loss" in e}
    for e in resumed.state.log_history:
        if "loss" in e:
            assert abs(e["loss"] - full_losses[e["step"]]) < 1e-4


def test_resuming_with_another_learning_rate_or_schedule_is_refused_naming_it(tmp_path):
    """The restored optimizer and schedule keep the checkpoint's rates: a changed one would be silently ignored."""
    make_trainer(tmp_path, method="kd", max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    for changed, named in ((dict(learning_rate=0.5), "learning_rate: 0.001 there, 0.5 here"),
                           (dict(adam_beta2=0.99), "adam_beta2: 0.999 there, 0.99 here"),
                           (dict(weight_decay=0.1), "weight_decay: 0.0 there, 0.1 here")):
        trainer = make_trainer(tmp_path, method="kd", max_steps=4, **changed)
        with pytest.raises(ValueError, match=f"other optimizer or schedule settings \\({named}\\).*Resume with"):
            trainer.train(resume_from_checkpoint=checkpoint)
        assert trainer.state.global_step == 0
    make_trainer(tmp_path, method="kd", max_steps=4).train(resume_from_checkpoint=checkpoint)
    # the schedule's shape and the optimizer's class are built from the config on resume: they may change
    make_trainer(tmp_path, method="kd", max_steps=4, lr_scheduler_type="cosine", warmup_steps=1,
                 optim="adamw_torch").train(resume_from_checkpoint=checkpoint)

    # another kind of optimizer would meet AdamW's state only inside its first step (a bare KeyError there)
    trainer = make_trainer(tmp_path, method="kd", max_steps=4, optim="sgd")
    with pytest.raises(ValueError, match=r"state of another optimizer: its parameter groups have no \[.*'momentum'.*"
                                         r"this run's SGD needs\. Resume with the `optim`"):
        trainer.train(resume_from_checkpoint=checkpoint)  # refused when the optimizer is built, before a step


def test_resuming_with_other_batches_is_refused_naming_them(tmp_path):
    """A step's place in the data is counted in images per optimizer step: other batches would resume elsewhere."""
    make_trainer(tmp_path, method="kd", max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    batch = make_trainer(tmp_path, method="kd", max_steps=4).args.per_device_train_batch_size
    for changed, named in ((dict(gradient_accumulation_steps=2), f"images_per_step: {batch} there, {2 * batch} here"),
                           (dict(dataloader_drop_last=True), "dataloader_drop_last: False there, True here")):
        trainer = make_trainer(tmp_path, method="kd", max_steps=4, **changed)
        with pytest.raises(ValueError, match=f"other batches \\({named};.*Resume with the batch settings"):
            trainer.train(resume_from_checkpoint=checkpoint)
        assert trainer.state.global_step == 0


@pytest.mark.parametrize("damage", ["remove", "truncate"])
def test_a_complete_checkpoint_whose_files_changed_since_is_refused_naming_them(tmp_path, damage):
    """Without optimizer.pt or scheduler.pt the Trainer restores neither and silently restarts the stage schedule at
    step 0 (the dictionaries trained in the KD stage); a truncated file failed after the weights had loaded."""
    make_trainer(tmp_path, method="kd", max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt"):
        if damage == "remove":
            (checkpoint / name).unlink()
        else:
            (checkpoint / name).write_bytes((checkpoint / name).read_bytes()[:10])
    trainer = make_trainer(tmp_path, method="kd", max_steps=4)
    detail = "missing" if damage == "remove" else "10 bytes, written"
    with pytest.raises(ValueError, match=f"marked complete, but its files changed since: optimizer.pt \\({detail}.*"
                                         f"scheduler.pt \\({detail}.*Resume from another checkpoint"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0

def test_save_total_limit_keeps_the_newest_complete_checkpoints_and_each_records_the_limit(tmp_path):
    # the trainer rotates older checkpoints itself, once the new one is marked complete (trainer_checkpoints.py)
    trainer = make_trainer(tmp_path, method="kd", max_steps=6, save_strategy="steps", save_steps=2,
                           save_total_limit=2)
    trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for name in ("checkpoint-4", "checkpoint-6"):
        assert (out / name / "checkpoint_complete.json").is_file()
        assert torch.load(out / name / "training_args.bin", weights_only=False).save_total_limit == 2
    assert trainer.args.save_total_limit == 2


def test_nonfinite_weights_are_never_written(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, srm_dictionary_max_steps=1, srm_max_steps=1)
    trainer.train()
    bn = next(m for m in trainer.distill_model.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN/inf.*running_var"):
        trainer.save_model(str(tmp_path / "diverged"))
    assert not (tmp_path / "diverged" / "model.safetensors").exists()


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_difference(tmp_path):
    first = make_trainer(tmp_path, save_strategy="steps", save_steps=6)
    first.train()
    other = make_trainer(tmp_path, srm_codeword_multiplier=3.0, save_strategy="steps", save_steps=6)
    before = {k: v.clone() for k, v in other.distill_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"another configuration.*'m': 2\.0.*'m': 3\.0"):
        other.train(resume_from_checkpoint=True)  # output_dir holds the first run's checkpoints
    after = other.distill_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded
    kd = make_trainer(tmp_path, method="kd", max_steps=12)
    with pytest.raises(ValueError, match="another configuration.*'name': 'srm'.*'name': 'kd'"):
        kd.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))


def test_a_model_adapted_for_the_plain_trainer_is_trained_and_saved_as_the_classifier_inside(tmp_path):
    from srm_hf.loading import for_trainer

    adapted = for_trainer(timm_resnet(seed=3))
    trainer = make_trainer(tmp_path, teacher=for_trainer(timm_resnet()), student=adapted, method="kd", max_steps=1)
    assert trainer.distill_model.student is adapted.model
    trainer.train()
    trainer.save_model()
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), adapted.model.eval()(x))
