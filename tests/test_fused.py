"""The fused Triton kernels' launch plans and the teacher's targets (srm_hf.fused) against the eager SRM maths, ties
included, in every layout; the kernel choice, a whole run, and compiling every kernel for a GPU without one. Without
a GPU they run under TRITON_INTERPRET=1 (set in conftest)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import HANG_GUARD_S, make_trainer
from fused_helpers import (DEVICE, LAYOUTS, PROJECTED, assert_fused_loss_equals_eager, eager_targets, fp32_precision,
                           integer_coder, layout, requires_triton)

from srm_hf.fused import srm_targets_fused, srm_targets_projected, use_fused
from srm_hf.srm import SparseCoder, project, srm_loss_fused

pytestmark = [requires_triton, pytest.mark.usefixtures("ieee_float32")]  # TF32 is tested on its own


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("k", [1, 3])
def test_fused_targets_equal_the_eager_ones(name, k):
    shape, dim = LAYOUTS[name]
    a = layout(name, 3 * torch.randn(shape, generator=torch.Generator().manual_seed(k)).to(DEVICE))
    pixel, image = srm_targets_fused(a, k)
    want_pixel, want_image = eager_targets(a, k, dim)
    assert pixel.dtype == torch.long and pixel.shape == want_pixel.shape and torch.equal(pixel, want_pixel)
    assert image.shape == want_image.shape
    torch.testing.assert_close(image, want_image, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", LAYOUTS)
def test_fused_targets_break_ties_like_the_eager_path(name):
    """Duplicated atoms give equal sigmoid values: both paths keep the lowest atom indices first, and label each
    pixel with its first maximal atom."""
    shape, dim = LAYOUTS[name]
    a = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    half = a.shape[dim] // 2
    a.narrow(dim, half, half).copy_(a.narrow(dim, 0, half))  # atoms j and j + K/2 are equal everywhere
    a = layout(name, a.to(DEVICE))
    for k in (1, 2, 4):
        pixel, image = srm_targets_fused(a, k)
        want_pixel, want_image = eager_targets(a, k, dim)
        assert torch.equal(pixel, want_pixel) and bool((pixel < half).all())  # the first of each equal pair
        torch.testing.assert_close(image, want_image, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [3, 10])  # 10: every atom kept
def test_fused_targets_agree_where_the_sigmoid_saturates(k):
    """z = 1.0 for every atom (a ≈ 45 ± 5) while a differs: both paths choose the kept set on a."""
    a = (45 + 5 * torch.randn(2, 10, 4, 4, generator=torch.Generator().manual_seed(0))).to(DEVICE)
    assert bool((torch.sigmoid(a) == 1).all())
    pixel, image = srm_targets_fused(a, k)
    want_pixel, want_image = eager_targets(a, k, 1)
    assert torch.equal(pixel, want_pixel)
    torch.testing.assert_close(image, want_image, rtol=1e-6, atol=1e-7)


def test_a_nan_feature_makes_its_image_labels_and_the_loss_nan_as_in_eager():
    a = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    a[1, 2, 0, 1] = float("nan")
    pixel, image = srm_targets_fused(a, 2)
    assert bool(image[0].isfinite().all()) and bool(image[1].isnan().all())
    assert int(pixel.min()) >= 0 and int(pixel.max()) < 6  # still valid class indices
    logits = torch.randn(2, 6, 3, 3).to(DEVICE)
    logits[0, 1, 1, 1] = float("nan")
    loss = srm_loss_fused(logits, pixel, image.nan_to_num(0.5))
    assert bool(loss["pixel"].isnan()) and bool(loss["image"].isnan())


@pytest.mark.parametrize("projected", [False, True])  # torch's projection, then the kernel; or the kernel's own
def test_a_coder_gives_the_same_targets_fused_and_eager(projected):
    torch.manual_seed(0)
    coder = SparseCoder(in_channels=6, num_atoms=12, num_active=2).to(DEVICE)
    x = torch.randn(2, 6, 4, 4, device=DEVICE)
    fused, eager = coder.targets(x, fused=True, projected=projected), coder.targets(x)
    assert torch.equal(fused[0], eager[0])
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", PROJECTED)
@pytest.mark.parametrize("atoms, k", [(40, 1), (40, 3), (300, 7), (700, 20)])  # 300: one block of 512, the widest
# one-block kernel; 700: the wide kernel, 256 atoms at a time (ties across blocks, a part-padded last block)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_targets_projected_in_the_kernel_equal_the_eager_ones_ties_included(name, atoms, k, dtype):
    coder = integer_coder(20, atoms, k, seed=atoms + k)
    t = torch.randint(-3, 4, PROJECTED[name], generator=torch.Generator().manual_seed(k)).to(dtype)
    t = layout(name, t).to(DEVICE)
    pixel, image = srm_targets_projected(t, coder.dictionary, coder.bias, k)
    want_pixel, want_image = coder.targets(t)  # eager: t in float32, torch's projection, top_k_mask
    assert pixel.dtype == torch.long and pixel.shape == want_pixel.shape and torch.equal(pixel, want_pixel)
    torch.testing.assert_close(image, want_image, rtol=1e-6, atol=1e-7)
    assert bool((pixel < atoms // 2).all())  # the first of two equal atoms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_targets_projected_from_real_valued_features(dtype):
    """Normal features and atoms: the labels equal the eager ones at every pixel whose decisive gaps (first to second
    largest a, k-th to (k+1)-th) exceed float32 rounding, and images made only of such pixels get the same labels."""
    g = torch.Generator().manual_seed(3)
    coder = SparseCoder(48, 96, 3).to(DEVICE)
    t = torch.randn(4, 48, 9, 9, generator=g).to(dtype).to(DEVICE)
    pixel, image = srm_targets_projected(t, coder.dictionary, coder.bias, 3)
    want_pixel, want_image = coder.targets(t)
    a = project(t.double(), coder.dictionary.double(), coder.bias.double()).sort(dim=1, descending=True).values
    decisive = ((a[:, 0] - a[:, 1]) > 1e-4) & ((a[:, 2] - a[:, 3]) > 1e-4)
    assert bool(decisive.float().mean() > 0.95)
    assert torch.equal(pixel[decisive], want_pixel[decisive])
    whole = decisive.flatten(1).all(dim=1)
    torch.testing.assert_close(image[whole], want_image[whole], rtol=1e-5, atol=1e-6)


def test_wide_dictionaries_that_keep_many_atoms_project_with_torch_first():
    """Over 512 atoms with k > WIDE_MAX_ACTIVE the wide kernel does not apply: the coder projects with torch, then
    the targets kernel."""
    from srm_hf.fused import WIDE_MAX_ACTIVE

    coder = integer_coder(20, 600, WIDE_MAX_ACTIVE + 1, seed=0)
    t = torch.randint(-3, 4, (2, 20, 4, 4), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    assert srm_targets_projected(t, coder.dictionary, coder.bias, coder.num_active) is None
    got, want = coder.targets(t, fused=True, projected=True), coder.targets(t)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:All-NaN slice", "ignore:overflow encountered in exp")  # the interpreter's numpy
@pytest.mark.parametrize("bias", [45.0, -150.0, float("nan")])
def test_the_wide_targets_kernel_labels_saturated_underflowing_and_nan_codes_as_eager(bias):
    """600 atoms (the wide kernel): every kept sigmoid 1.0 (a ≈ 45, the label the first kept atom), 0.0 (a ≈ -150,
    every code 0: atom 0, as argmax gives it), or NaN (NaN image labels, labels still valid indices)."""
    coder = integer_coder(4, 600, 5, seed=1)
    with torch.no_grad():
        coder.bias.fill_(bias)
    t = torch.randint(-3, 4, (2, 4, 3, 3), generator=torch.Generator().manual_seed(1)).float().to(DEVICE)
    pixel, image = srm_targets_projected(t, coder.dictionary, coder.bias, 5)
    want_pixel, want_image = coder.targets(t)
    if bias != bias:
        assert bool(image.isnan().all()) and bool(pixel.eq(0).all())
        return
    assert torch.equal(pixel, want_pixel) and (bias > 0 or bool(pixel.eq(0).all()))
    torch.testing.assert_close(image, want_image, rtol=1e-6, atol=1e-7)


@pytest.mark.own_float32_settings  # reads and sets the legacy flags, which torch refuses after the new API
def test_the_projection_in_the_kernel_uses_tf32_where_torch_would(monkeypatch):
    """cuDNN convolutions (maps) use TF32 by default, matmuls (tokens, vectors) only when allowed: the kernel's dot
    follows the same switches, set through the legacy flags or through the `fp32_precision` settings (which
    transformers' `--tf32` uses, and after which reading the legacy flags raises)."""
    from srm_hf import fused

    seen = []
    launch = fused.launch_kernel
    monkeypatch.setattr(fused, "launch_kernel", lambda kernel, grid, *args, **meta: (
        seen.append(meta["PRECISION"]), launch(kernel, grid, *args, **meta)))
    coder = integer_coder(20, 40, 2, seed=0)
    maps, tokens = torch.zeros(1, 20, 2, 2, device=DEVICE), torch.zeros(1, 3, 20, device=DEVICE)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 in ((True, False), (False, True)):
            for t in (maps, tokens):
                srm_targets_projected(t, coder.dictionary, coder.bias, 2)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen == ["tf32", "ieee", "ieee", "tf32"]
    seen.clear()
    for convolution, matmul in (("ieee", "tf32"), ("tf32", "ieee")):
        with fp32_precision(convolution, matmul):
            for t in (maps, tokens):
                srm_targets_projected(t, coder.dictionary, coder.bias, 2)
    assert seen == ["ieee", "tf32", "tf32", "ieee"]
    saved = torch.backends.fp32_precision
    with fp32_precision("none", "none"):  # both inherit the global setting, which transformers' enable_tf32 sets
        for precision in ("tf32", "ieee"):
            try:
                torch.backends.fp32_precision = precision
                for t in (maps, tokens):
                    srm_targets_projected(t, coder.dictionary, coder.bias, 2)
            finally:
                torch.backends.fp32_precision = saved
    assert seen[4:] == ["tf32", "tf32", "ieee", "ieee"]


@pytest.mark.parametrize("name", ["maps", "maps, channels last", "tokens"])
def test_the_projected_kernels_sum_over_several_blocks_per_program(monkeypatch, name):
    """With long runs of pixels per program (MIN_PROGRAMS = 1: 289 pixels in runs of 256, blocks of 32), the kernels
    that project the features themselves still give the eager targets, stage 1's loss and gradients, and the
    student's loss and gradients: their sums across blocks are exercised, not only one block per program."""
    from srm_hf import fused
    from srm_hf.fused_dictionary import dictionary_loss_projected
    from srm_hf.srm import SRMHead, dictionary_loss, srm_loss, srm_loss_projected

    monkeypatch.setattr(fused, "MIN_PROGRAMS", 1)
    shape = {"tokens": (2, 289, 20)}.get(name, (2, 20, 17, 17))
    t = layout(name, torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(5)).float()).to(DEVICE)
    coder, head = integer_coder(20, 40, 3, seed=5), SRMHead(20, 40).to(DEVICE)
    _, plan = fused.projected_plan(t, coder.dictionary)
    assert plan.per_program >= 8 * plan.block_s
    pixel, image = srm_targets_projected(t, coder.dictionary, coder.bias, 3)
    want_pixel, want_image = coder.targets(t)
    assert torch.equal(pixel, want_pixel)
    torch.testing.assert_close(image, want_image, rtol=1e-6, atol=1e-7)
    student = []  # the student's loss through its head, eager then projected: (loss, dL/dP, dL/dc, dL/ds)
    for projected in (False, True):
        s = t.clone().requires_grad_()
        terms = srm_loss_projected(s, head, pixel, image) if projected else srm_loss(head(s), pixel, image)
        loss = sum(terms.values())
        student.append((loss.detach(), *torch.autograd.grad(loss, [head.weight, head.bias, s])))
    stage_one = []  # stage 1, eager then in two kernels: (loss, dL/dD, dL/db)
    for projected in (False, True):
        loss = dictionary_loss_projected(t, coder.dictionary, coder.bias, 3) if projected else \
            dictionary_loss(t, coder(t)[1])
        stage_one.append((loss.detach(), *torch.autograd.grad(loss, [coder.dictionary, coder.bias])))
    for want, got in (student, stage_one):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_empty_batches_and_wide_layouts_are_left_to_torch_or_copied():
    """An empty batch goes the eager way (its NaN); a layout whose offsets within one image would pass 32 bits (the
    batch not outermost) is copied before a kernel reads it."""
    from srm_hf.fused import pixel_view, projected_plan

    coder = integer_coder(20, 40, 2, seed=0)
    assert projected_plan(torch.zeros(0, 20, 3, 3, device=DEVICE), coder.dictionary) is None
    assert srm_targets_projected(torch.zeros(0, 5, 20, device=DEVICE), coder.dictionary, coder.bias, 2) is None
    sequence_first = torch.empty(70000, 2, 16400, device="meta").transpose(0, 1)  # [N, L, K], pixels N·K apart
    view = pixel_view(sequence_first)
    assert view.x.is_contiguous() and view.strides == (70000 * 16400, 1, 16400)
    assert pixel_view(torch.empty(2, 5, 16, device="meta").transpose(0, 1).transpose(0, 1)).x.stride() == (80, 16, 1)


def test_features_that_do_not_fit_the_dictionary_are_refused():
    coder = integer_coder(20, 40, 2, seed=0)
    with pytest.raises(ValueError, match=r"features \(2, 24, 3, 3\) have 24 channels, the dictionary \(20, 40\) 20"):
        srm_targets_projected(torch.zeros(2, 24, 3, 3, device=DEVICE), coder.dictionary, coder.bias, 2)


@pytest.mark.parametrize("min_programs", [1, 1024])
def test_the_launch_plan_does_not_change_the_results(monkeypatch, min_programs):
    """Long runs of pixels per program (several blocks each, partial sums across blocks) and the short runs that
    small maps get (one block per program, many partial sums per image) give the eager targets, loss and gradient."""
    from srm_hf import fused

    monkeypatch.setattr(fused, "MIN_PROGRAMS", min_programs)
    g = torch.Generator().manual_seed(4)
    a, logits = (torch.randn(2, 40, 23, 23, generator=g).to(DEVICE) for _ in range(2))
    plan = fused.launch_for(fused.pixel_view(a))
    assert (plan.per_program, plan.chunks) == ((256, 3) if min_programs == 1 else (64, 9))
    pixel, image = srm_targets_fused(a, 3)
    want_pixel, want_image = eager_targets(a, 3, 1)
    assert torch.equal(pixel, want_pixel)
    torch.testing.assert_close(image, want_image, rtol=1e-6, atol=1e-7)
    logits.requires_grad_()
    assert_fused_loss_equals_eager(logits, pixel, image)


def test_small_maps_get_enough_programs_and_large_maps_long_runs():
    from srm_hf.fused import MIN_PROGRAMS, PIXELS_PER_PROGRAM, launch_for, pixel_view

    def programs(shape):
        plan = launch_for(pixel_view(torch.empty(shape, device="meta")))
        return shape[0] * plan.chunks, plan.per_program

    assert programs((128, 1024, 7, 7)) == (128 * 13, 4)  # ResNet layer4 at 224 px: was one program per image
    assert programs((16, 512, 7, 7)) == (16 * 7, 8)  # as many as one block per program gives
    assert programs((128, 128, 56, 56)) == (128 * 13, PIXELS_PER_PROGRAM)  # layer1: long runs, few partial sums
    assert programs((128, 256, 28, 28))[0] >= MIN_PROGRAMS


def test_the_kernel_choice_is_automatic_and_can_be_forced(monkeypatch):
    cpu = torch.zeros(1)
    assert not use_fused("auto", cpu) and not use_fused("eager", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_fused("triton", cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*srm_kernels='auto'"):
        use_fused("triton", cpu)
    with pytest.raises(ValueError, match="srm_kernels='fast' is not one of"):
        use_fused("fast", cpu)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs need TRITON_INTERPRET=1 (conftest "
                    "sets it where there is no GPU); tests/test_gpu.py runs the kernels on CUDA")
@pytest.mark.parametrize("mode", ["paper", "joint"])
def test_an_srm_run_with_the_kernels_equals_the_eager_run(tmp_path, mode):
    """The kernels with torch's projections (the default) and with their own (`srm_kernel_projections`)."""
    runs = {}
    for kernels, projections in (("eager", False), ("triton", False), ("triton", True)):
        trainer = make_trainer(tmp_path / f"{kernels}{projections}", srm_mode=mode, srm_kernels=kernels, max_steps=3,
                               srm_dictionary_max_steps=2, srm_max_steps=3, srm_kernel_projections=projections)
        trainer.train()
        runs[kernels, projections] = ([e["loss"] for e in trainer.state.log_history if "loss" in e],
                                      {k: v.clone() for k, v in trainer.distill_model.student.state_dict().items()})
    want_losses, want_weights = runs.pop(("eager", False))
    for losses, weights in runs.values():
        torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
        # Adam divides by √v: where a weight's gradient is near 0 its update is a ratio of rounding-sized numbers, so
        # after 8 steps single weights may differ by a fraction of a step (lr 1e-3, seen up to 1.7e-4 with other
        # library versions); a wrong gradient moves whole tensors by whole steps. So each tensor is compared whole
        for key, value in want_weights.items():
            got = weights[key]
            if value.is_floating_point():
                assert (got - value).norm() <= 1e-3 * value.norm() + 1e-6, key
            else:
                assert torch.equal(got, value), key  # e.g. BatchNorm's step counts


def test_projections_in_the_kernels_without_the_kernels_are_refused(tmp_path):
    with pytest.raises(ValueError, match="srm_kernel_projections=True.*srm_kernels='eager'.*srm_kernels='auto'"):
        make_trainer(tmp_path, srm_kernels="eager", srm_kernel_projections=True)


def test_a_kernel_that_does_not_compile_names_the_eager_switch():
    from triton.runtime.errors import OutOfResources

    from srm_hf.fused import launch_for, pixel_view, run_pixels

    class Kernel:
        fn = srm_targets_fused

        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise OutOfResources(99, 1, "shared memory")
            return launch

    with pytest.raises(RuntimeError, match="srm_targets_fused does not compile.*srm_kernels='eager'"):
        view = pixel_view(torch.zeros(2, 4))
        run_pixels(Kernel(), view, launch_for(view))


def test_every_kernel_compiles_for_a_cuda_gpu():
    """Triton's compiler and ptxas, for sm_90 (the wide kernels for sm_80 too), without a GPU: what the
    interpreter accepts must also compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "compile_kernels.py")], env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "cubin bytes" in line]
    assert len(lines) == 39 and all(int(line.split()[-1]) > 0 for line in lines)
    projected = [line.split() for line in lines if line.startswith(("projected_", "dictionary_", "wide_"))]
    assert len(projected) == 28  # the dot kernels: under 40 kB of shared memory (GPUs since 2020), and no register
    assert all(int(words[words.index("shared") + 1]) < 40 * 1024 for words in projected)  # spills with the Triton
    if triton_version() >= (3, 8):  # they were laid out for (torch 2.14's); Triton 3.6 spills up to 220 bytes
        assert all(words[words.index("spill") + 2] == "0" for words in projected)


def triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def test_the_last_program_of_each_launch_finishes_its_sums_and_resets_the_counters():
    """Image labels, both loss terms, stage 1's MSE and the bias gradients are summed inside their launch by the last
    program to finish, which puts the shared counters back to 0: every call leaves them at 0, so the next launch, on
    the same buffer, finishes too (the results of a second round equal the first)."""
    from srm_hf import fused
    from srm_hf.fused_dictionary import dictionary_loss_projected, mse_fused
    from srm_hf.srm import SRMHead, srm_loss_projected

    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, 20, 9, 7, generator=g).to(DEVICE)
    coder, head = integer_coder(20, 40, 3, seed=3).to(DEVICE), SRMHead(20, 40).to(DEVICE)

    def one_round():
        pixel, image = srm_targets_projected(features, coder.dictionary, coder.bias, 3)
        terms = srm_loss_projected(features.clone().requires_grad_(), head, pixel, image, 1.0, 1.0, True)
        head.zero_grad()
        sum(terms.values()).backward()
        coder.zero_grad()
        stage_one = dictionary_loss_projected(features, coder.dictionary, coder.bias, 3)
        stage_one.backward()
        mse = mse_fused(features * 0.5, features)
        return [pixel, image, *terms.values(), head.bias.grad.clone(), stage_one, coder.bias.grad.clone(), mse]

    for first, second in zip(one_round(), one_round()):
        assert torch.equal(first, second)
    assert fused._COUNTERS and all(not buffer.any() for buffer in fused._COUNTERS.values())
