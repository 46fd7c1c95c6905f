"""On a CUDA GPU: bf16 and fp16 training, a student compiled by Inductor, and the FSDP and DeepSpeed engines.

These need hardware that CI lacks, so they are skipped there; run them on a GPU machine with
`pytest tests/test_gpu.py` (README.md, "Which backends were exercised", says when they last ran and on what).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import (HANG_GUARD_S, PatternDataset, changed, hf_resnet, make_config, make_trainer, snapshot,
                      timm_resnet)
from fused_helpers import fp32_precision
from test_precision import DtypeProbe
from test_recipes import ROOT, TINY, tiny_fashion_idx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def finite_logs(trainer) -> bool:
    return all(math.isfinite(v) for e in trainer.state.log_history for k, v in e.items() if "/" in k or k == "loss")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["paper", "joint"])
def test_mixed_precision_on_cuda(tmp_path, precision, mode):
    teacher = timm_resnet()
    trainer = DtypeProbe(model=hf_resnet(), teacher_model=teacher, train_dataset=PatternDataset(64),
                         args=make_config(tmp_path, use_cpu=False, srm_mode=mode, max_steps=6, srm_dictionary_max_steps=4,
                                          srm_max_steps=4, **{precision: True}))
    assert next(trainer.teacher.parameters()).is_cuda
    frozen = snapshot(trainer.teacher)
    start = snapshot(trainer.distill_model)
    trainer.train()
    assert not changed(frozen, snapshot(trainer.teacher))  # the teacher, BatchNorm buffers included
    assert changed(start, snapshot(trainer.distill_model), "student.")
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert trainer.seen["teacher_features"] == half  # autocast reached the teacher
    assert trainer.seen["image_targets"] == torch.float32
    assert all(trainer.seen[k] == torch.float32 for k in ("kd", "ce") + (("pixel", "image") if mode == "joint" else ()))
    assert finite_logs(trainer)
    assert all(p.dtype == torch.float32 for p in trainer.distill_model.parameters())


def test_student_compiled_by_inductor_on_cuda(tmp_path):
    torch._dynamo.reset()
    trainer = DtypeProbe(model=hf_resnet(), teacher_model=timm_resnet(), train_dataset=PatternDataset(32),
                         args=make_config(tmp_path, use_cpu=False, srm_mode="joint", bf16=True, compile_student=True,
                                          srm_dictionary_max_steps=2, max_steps=3))
    before = snapshot(trainer.distill_model)
    trainer.train()
    after = snapshot(trainer.distill_model)
    assert changed(before, after, "method.heads.") and changed(before, after, "student.")
    assert finite_logs(trainer)
    torch._dynamo.reset()


def test_a_teacher_replayed_as_cuda_graphs_gives_the_srm_run_an_eager_teacher_gives(tmp_path):
    """compile_teacher with mode 'reduce-overhead': the taps read CUDA-graph output buffers that the next replay
    overwrites, so the targets must be taken before it. The loss terms follow the eager teacher's run: to 5e-3 up to
    the first joint step (labels from another batch would miss by far more), to 1e-2 after it, where Inductor's
    arithmetic (not the eager teacher's, bit for bit) has moved the students apart (2.2e-3 at the fifth step on an
    H100). Inductor's teacher features also flip a few pixel labels at near ties: the first joint step's pixel term
    differed by 2.4e-3 on an H200 (19.954 against 20.001)."""
    from srm_hf import DistillationTrainer

    terms = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        config = make_config(tmp_path / str(compiled), use_cpu=False, srm_mode="joint", srm_dictionary_max_steps=2,
                             max_steps=5, compile_teacher=compiled,
                             torch_compile_mode="reduce-overhead" if compiled else None)
        trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=config,
                                      train_dataset=PatternDataset(32))
        trainer.train()
        assert finite_logs(trainer)
        terms[compiled] = [[v for k, v in sorted(e.items()) if "/" in k] for e in trainer.state.log_history]
    assert len(terms[True]) == len(terms[False]) > 0
    first_joint = next(i for i, e in enumerate(trainer.state.log_history) if any(k.startswith("joint/") for k in e))
    torch.testing.assert_close(terms[True][:first_joint + 1], terms[False][:first_joint + 1], rtol=5e-3, atol=1e-5)
    torch.testing.assert_close(terms[True], terms[False], rtol=1e-2, atol=1e-5)
    torch._dynamo.reset()


ENGINES = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}


def given_teacher(args: list[str]) -> list[str]:
    """The tiny recipe arguments without their teacher training (the engine tests pass a ready teacher)."""
    drop = {"--train_teacher", "--teacher_max_steps"}
    return [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]


@pytest.mark.parametrize("engine", ENGINES)
def test_recipe_runs_under_engine(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    data = tiny_fashion_idx(tmp_path)
    out, teacher = tmp_path / "run", tmp_path / "teacher"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # DeepSpeed allows one Trainer per process, so the teacher is trained first, as the recipe's error says
    subprocess.run([sys.executable, str(ROOT / "recipes/train_teacher.py"), "--dataset_dir", data, "--output_dir",
                    str(teacher), "--teacher_max_steps", "3", "--per_device_train_batch_size", "8", "--report_to",
                    "none"], env=env, check=True, capture_output=True, cwd=ROOT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate_configs" / ENGINES[engine]), "--num_processes", "1",
           str(ROOT / "recipes/distill.py"), "--dataset_dir", data, "--output_dir", str(out),
           "--teacher_model_name_or_path", str(teacher), "--compare", "none", "--report", "false", *given_teacher(TINY)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["metrics"]["student_accuracy"] <= 1.0 and 0.0 <= results["metrics"]["teacher_accuracy"] <= 1
    student = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    logits = student(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


@pytest.mark.parametrize("channels, size, k", [(64, 56, 2), (512, 7, 20)])  # ResNet-18's first and last taps
def test_fused_kernels_equal_eager_at_resnet18_tap_sizes(channels, size, k):
    """The compiled Triton kernels at real block sizes (K = 2C up to 1024): targets identical away from ties,
    losses and gradients to 1e-5 relative in float32."""
    from srm_hf.fused import srm_targets_fused
    from srm_hf.srm import srm_loss, srm_loss_fused, srm_targets, top_k_mask

    g = torch.Generator(device="cuda").manual_seed(0)
    a = 4 * torch.randn(16, 2 * channels, size, size, device="cuda", generator=g)
    z = torch.sigmoid(a)
    pixel, image = srm_targets(z * top_k_mask(a, k, 1))
    got_pixel, got_image = srm_targets_fused(a, k)
    top2 = z.topk(2, dim=1).values  # the kept set is exact (chosen on a); the label, the first maximal sigmoid among
    near_tie = (top2[:, 0] - top2[:, 1]) <= 1e-6  # them, may differ where the kernel's sigmoid rounds differently
    assert not bool(((got_pixel != pixel) & ~near_tie).any())
    torch.testing.assert_close(got_image, image, rtol=1e-5, atol=1e-6)
    logits = torch.randn(16, 2 * channels, size, size, device="cuda", generator=g).requires_grad_()
    for on_sigmoid in (True, False):
        want = srm_loss(logits, pixel, image, pixel_ce_on_sigmoid=on_sigmoid)
        got = srm_loss_fused(logits, pixel, image, pixel_ce_on_sigmoid=on_sigmoid)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
        want_grad, = torch.autograd.grad(sum(want.values()), logits)
        got_grad, = torch.autograd.grad(sum(got.values()), logits)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("channels, size, k", [(64, 56, 2), (256, 14, 10), (512, 7, 20)])  # K = 128 and 512 in
# one block of atoms; K = 1024 (layer4) in the wide kernel, 256 atoms at a time
@pytest.mark.parametrize("tf32", [True, False])
def test_targets_projected_in_the_kernel_at_resnet18_tap_sizes(channels, size, k, tf32):
    """bf16 post-ReLU features, as a bf16 teacher leaves them: the kernel's own projection gives torch's labels at
    every pixel whose decisive gaps in a (float64) exceed the rounding of the precision in use (TF32 or IEEE float32,
    torch's convolution and the kernel's dot alike); a pixel that may flip moves an image label by at most 1/S. TF32
    keeps 10 bits of each of D's values (t in bf16 is exact), so each side's a is off by at most 2⁻¹⁰ Σ_c |t_c D_ck|:
    a gap over twice the pixel's largest such bound is decided alike on both sides. (A fixed 1e-2 was below that
    bound at 512 channels, and compared 47 % of the pixels on an H200.)"""
    from srm_hf.fused import srm_targets_projected
    from srm_hf.srm import SparseCoder, project

    torch.manual_seed(0)
    coder = SparseCoder(channels, 2 * channels, k).cuda()
    t = torch.randn(16, channels, size, size, device="cuda").relu().bfloat16()
    with fp32_precision("tf32" if tf32 else "ieee", "ieee"):
        pixel, image = srm_targets_projected(t, coder.dictionary, coder.bias, k)
        want_pixel, want_image = coder.targets(t)
    d = coder.dictionary.double()
    a = project(t.double(), d, coder.bias.double()).sort(dim=1, descending=True).values
    rounding = project(t.double().abs(), d.abs(), torch.zeros((), dtype=torch.float64, device="cuda")).amax(dim=1)
    tol = 2 * 2**-10 * rounding if tf32 else 1e-4  # per pixel under TF32
    decisive = ((a[:, 0] - a[:, 1]) > tol) & ((a[:, k - 1] - a[:, k]) > tol)
    assert bool(decisive.float().mean() > 0.2)  # a fair share of the pixels is compared
    assert torch.equal(pixel[decisive], want_pixel[decisive])
    may_flip = (~decisive).flatten(1).sum(dim=1, keepdim=True) / decisive[0].numel()
    assert bool(((image - want_image).abs() <= may_flip + 1e-5).all())


@pytest.mark.parametrize("channels, size", [(64, 56), (128, 28), (256, 14), (512, 7)])  # K = 128 and 256: one
# block of atoms; K = 512 and 1024: the wide kernels (their write-back-and-read within a program, which the
# interpreter cannot check)
def test_stage_one_in_two_kernels_at_resnet18_tap_sizes(channels, size):
    """Stage 1's loss and dictionary gradients from the two compiled kernels and one matmul: those of the eager coder
    in IEEE float32 (TF32 off on both sides) to 1e-4 relative (codes may differ at near ties), and under bf16
    autocast from bf16 maps within bf16's rounding."""
    from srm_hf.fused_dictionary import dictionary_loss_projected
    from srm_hf.srm import SparseCoder, dictionary_loss

    torch.manual_seed(0)
    coder = SparseCoder(channels, 2 * channels, max(1, channels // 50)).cuda()
    t = torch.randn(16, channels, size, size, device="cuda").relu()

    def loss_and_grads(fused, features):
        loss = dictionary_loss_projected(features, coder.dictionary, coder.bias, coder.num_active) if fused else \
            dictionary_loss(features, coder(features)[1])
        return (loss, *torch.autograd.grad(loss, [coder.dictionary, coder.bias]))

    with fp32_precision("ieee", "ieee"):
        want, got = loss_and_grads(False, t), loss_and_grads(True, t)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = loss_and_grads(True, t.bfloat16())
    want = loss_and_grads(False, t.bfloat16().float())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=1e-4)


@pytest.mark.parametrize("channels, size, atoms", [(64, 56, 128), (128, 28, 256), (256, 14, 512), (512, 7, 1024),
                                                  (200, 9, 1000)])
def test_the_loss_through_the_head_in_the_kernels_at_resnet18_tap_sizes(channels, size, atoms):
    """The student's SRM loss with the head's projection inside the compiled kernels: terms and gradients in s, P
    and c as `srm_loss(head(s))` gives them in IEEE float32, to 1e-4 relative (512 and more atoms: 256 at a time;
    1,000: the last block part padding)."""
    from srm_hf.srm import SRMHead, srm_loss, srm_loss_projected, srm_targets, top_k_mask

    torch.manual_seed(0)
    head = SRMHead(channels, atoms).cuda()
    s = torch.randn(16, channels, size, size, device="cuda").relu().requires_grad_()
    a = 4 * torch.randn(16, atoms, size, size, device="cuda")
    pixel, image = srm_targets(torch.sigmoid(a) * top_k_mask(a, 3, 1))
    results = []
    with fp32_precision("ieee", "ieee"):
        for projected in (False, True):
            terms = srm_loss_projected(s, head, pixel, image) if projected else srm_loss(head(s), pixel, image)
            loss = sum(terms.values())
            results.append((loss, *torch.autograd.grad(loss, [s, head.weight, head.bias])))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_nonfinite_step_is_skipped_on_the_device_and_counted(tmp_path):
    """On CUDA the fused AdamW skips the NaN step from a device flag that the host reads back later, without
    waiting: the count, the untouched parameters and the stop after too many in a row are those of the CPU runs."""
    from test_precision import nan_trainer

    trainer = nan_trainer(tmp_path / "skip", use_cpu=False, bf16=True)
    trainer.train()
    skipped = [e["nonfinite_steps_skipped"] for e in trainer.state.log_history if "nonfinite_steps_skipped" in e]
    assert skipped == [0, 0, 0, 0, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.distill_model.parameters())
    fp16 = nan_trainer(tmp_path / "fp16", use_cpu=False, fp16=True)  # the gradient scaler skips the step itself
    fp16.train()
    assert [e["nonfinite_steps_skipped"] for e in fp16.state.log_history if "loss" in e] == skipped
    with pytest.raises(FloatingPointError, match="stage 'joint', step 5"):
        nan_trainer(tmp_path / "stop", use_cpu=False, max_nonfinite_steps=0).train()
    # no log in between: each outcome is read one step later, the last ones at the end of training
    quiet = dict(use_cpu=False, logging_steps=100, logging_nan_inf_filter=False)
    trainer = nan_trainer(tmp_path / "quiet", **quiet)
    trainer.train()
    assert trainer.nonfinite.skipped == 1
    with pytest.raises(FloatingPointError, match="stage 'joint', step 5"):
        nan_trainer(tmp_path / "quiet stop", max_nonfinite_steps=0, **quiet).train()


def test_a_fused_srm_step_captured_in_a_cuda_graph_replays_what_it_computes_eagerly(tmp_path):
    """What `recipes/benchmarks/graph_step.py` relies on: an SRM joint step with the fused kernels (teacher forward,
    labels, student, Triton loss, backward) captured once, then replayed on a new batch copied into the captured
    inputs, gives the loss and gradients that the same step computes eagerly on that batch."""
    from srm_hf.stages import StagePlan

    def batch_of(seed):
        data = PatternDataset(8, seed=seed)
        return {k: torch.stack([data[i][k] for i in range(8)]).cuda() for k in ("pixel_values", "labels")}

    trainer = make_trainer(tmp_path, use_cpu=False, bf16=True, srm_mode="joint", srm_dictionary_max_steps=1)
    trainer.plan = StagePlan([(next(s for s in trainer.method.stages() if s.name == "joint"), 1)])
    model = trainer.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batch_of(0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: kernel compilation and lazy state outside the graph
        for _ in range(2):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    captured_grads = [p.grad for p in params]
    for k, v in batch_of(1).items():  # a new batch, in the tensors the graph reads
        batch[k].copy_(v)
    for p in params:
        p.grad = None
    want = step().detach()
    want_grads = [p.grad for p in params]
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured_loss.detach(), want, rtol=1e-3, atol=1e-5)
    assert [g is None for g in captured_grads] == [g is None for g in want_grads]
    assert any(g is not None for g in want_grads)
    for got, expected in zip(captured_grads, want_grads):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-4)


def test_channels_last_on_cuda_trains_the_nchw_student_through_the_kernels(tmp_path):
    """NHWC maps through cuDNN and the fused SRM kernels (the default on CUDA) give the NCHW run's training in IEEE
    float32; under bf16 the NHWC run stays finite."""
    from test_channels_last import assert_same_student, run

    with fp32_precision("ieee", "ieee"):
        _, want_losses, want_weights = run(tmp_path / "nchw", use_cpu=False)
        trainer, losses, weights = run(tmp_path / "nhwc", use_cpu=False, channels_last=True)
    assert trainer.layouts == {"teacher": {True}, "student": {True}}
    torch.testing.assert_close(losses, want_losses, rtol=1e-4, atol=1e-6)
    assert_same_student({k: v.cpu() for k, v in weights.items()}, {k: v.cpu() for k, v in want_weights.items()})
    trainer, _, _ = run(tmp_path / "bf16", use_cpu=False, channels_last=True, bf16=True)
    assert trainer.layouts == {"teacher": {True}, "student": {True}} and finite_logs(trainer)
