"""`channels_last=True`: student, teacher and images in NHWC memory format; the same training, another layout."""

import os

import pytest
import timm
import torch
import torch.nn as nn

from conftest import PatternDataset, hf_resnet, make_trainer, timm_resnet
from srm_hf import DistillationTrainer

CHANNELS_LAST = torch.channels_last


def is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=CHANNELS_LAST) and not x.is_contiguous()


class LayoutTrainer(DistillationTrainer):
    """Records whether the teacher's tapped maps and the student's first block output came in NHWC."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts = {"teacher": set(), "student": set()}
        first = getattr(self.distill_model.student, "resnet", None)  # the transformers ResNet of make_trainer
        if first is not None:
            first.embedder.register_forward_hook(lambda module, inputs, output: self.layouts["student"].add(
                is_nhwc(output)))

    def teacher_forward(self, inputs):
        features = super().teacher_forward(inputs)
        self.layouts["teacher"] |= {is_nhwc(x) for x in features.features.values() if x.dim() == 4}
        return features


def run(tmp_path, **config):
    trainer = make_trainer(tmp_path, cls=LayoutTrainer, srm_mode="joint", max_steps=3, srm_dictionary_max_steps=2,
                           **config)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer, losses, {k: v.clone() for k, v in trainer.distill_model.student.state_dict().items()}


def assert_same_student(weights, want):
    for key, value in want.items():
        if value.is_floating_point():  # whole tensors: Adam's update of a near-zero gradient is rounding-sized
            assert (weights[key] - value).norm() <= 1e-4 * value.norm() + 1e-6, key
        else:
            assert torch.equal(weights[key], value), key


def test_channels_last_trains_the_same_student_in_nhwc(tmp_path):
    nchw, want_losses, want_weights = run(tmp_path / "nchw")
    trainer, losses, weights = run(tmp_path / "nhwc", channels_last=True)
    assert trainer.layouts == {"teacher": {True}, "student": {True}}  # every map of every step
    for model in (trainer.distill_model.student, trainer.teacher):
        convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
        assert convs and all(p.is_contiguous(memory_format=CHANNELS_LAST) for p in convs)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert_same_student(weights, want_weights)
    # evaluation and saving: the same loss, and a student that transformers loads without srm_hf
    assert trainer.evaluate()["eval_loss"] == pytest.approx(nchw.evaluate()["eval_loss"], rel=1e-4)
    trainer.save_model()
    from transformers import AutoModelForImageClassification

    loaded = AutoModelForImageClassification.from_pretrained(trainer.args.output_dir).eval()
    images = PatternDataset(4, seed=3).images
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, trainer.distill_model.student.eval()(images).logits,
                                   rtol=1e-5, atol=1e-5)


class Flat(nn.Module):
    """No 4-D weights: its images stay NCHW, which its `.view` needs."""

    def __init__(self, convolution: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Conv2d(3, 3, 3, padding=1) if convolution else nn.Identity()
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.view(x.shape[0], -1))


def test_a_model_without_convolutions_keeps_nchw_images_beside_an_nhwc_teacher(tmp_path):
    trainer = make_trainer(tmp_path, student=Flat(), cls=LayoutTrainer, method="kd", max_steps=2, channels_last=True)
    trainer.distill_model.student.register_forward_pre_hook(
        lambda module, inputs: trainer.layouts["student"].add(inputs[0].is_contiguous()))
    trainer.teacher.register_forward_pre_hook(lambda module, inputs: trainer.layouts["teacher"].add(is_nhwc(inputs[0])))
    trainer.train()
    assert trainer.distill_model.nhwc == {"student": False, "teacher": True}
    assert trainer.layouts == {"teacher": {True}, "student": {True}}  # NHWC images for the teacher, NCHW here


def test_a_model_that_views_nhwc_maps_is_refused_before_training_naming_channels_last(tmp_path):
    with pytest.raises(ValueError, match=r"student \(Flat\) cannot take.*channels_last=True.*\.reshape.*"
                                         "channels_last=False"):
        make_trainer(tmp_path, student=Flat(convolution=True), method="kd", channels_last=True)
    make_trainer(tmp_path, student=Flat(convolution=True), method="kd")  # in NCHW it runs


def test_a_timm_student_in_channels_last_saves_a_checkpoint_timm_loads(tmp_path):
    trainer = make_trainer(tmp_path, student=timm_resnet(seed=1), teacher=hf_resnet(), method="kd", max_steps=2,
                           channels_last=True)
    trainer.train()
    trainer.save_model()
    loaded = timm.create_model(f"local-dir:{trainer.args.output_dir}", pretrained=True).eval()
    assert all(p.is_contiguous() for p in loaded.parameters())
    images = PatternDataset(4, seed=3).images
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trainer.distill_model.student.eval()(images), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs need TRITON_INTERPRET=1 (conftest "
                    "sets it where there is no GPU); tests/test_gpu.py runs the kernels on CUDA")
def test_the_kernels_read_nhwc_maps_as_the_eager_maths_reads_nchw(tmp_path):
    _, want_losses, want_weights = run(tmp_path / "eager")
    trainer, losses, weights = run(tmp_path / "fused", channels_last=True, srm_kernels="triton")
    assert trainer.layouts == {"teacher": {True}, "student": {True}}
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert_same_student(weights, want_weights)


def test_a_channels_last_run_resumes_in_the_middle_of_stage_2_as_if_uninterrupted(tmp_path):
    """The checkpoint's weights and Adam moments are written contiguous and read back into NHWC parameters."""
    full = make_trainer(tmp_path / "full", channels_last=True, save_strategy="steps", save_steps=6)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", student=hf_resnet(seed=7), channels_last=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-6"))
    assert resumed.state.global_step == 12
    assert all(p.is_contiguous(memory_format=CHANNELS_LAST) for p in resumed.distill_model.parameters() if p.dim() == 4)
    a, b = full.distill_model.state_dict(), resumed.distill_model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_cost_benchmark_times_the_steps_in_nhwc(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "benchmarks"))
    import cost

    args = cost.argparse.Namespace(teacher="resnet18", student="resnet10t", batch=2, size=32, device="cpu",
                                   bf16=False, channels_last=True)
    trainer, batch = cost.build(args)
    assert trainer.args.channels_last and is_nhwc(batch["pixel_values"])
    out = tmp_path / "cost.md"
    times, _ = cost.main(["--steps", "1", "--warmup", "0", "--size", "32", "--batch", "2", "--teacher", "resnet18",
                          "--student", "resnet10t", "--channels_last", "--out", str(out)])
    assert "SRM joint step" in times and "fp32, channels_last" in out.read_text()
