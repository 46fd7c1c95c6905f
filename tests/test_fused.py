"""The fused Triton kernels (srm_hf.fused) against the eager SRM maths: the same targets, losses and gradients in
every layout, ties included. Without a GPU they run under TRITON_INTERPRET=1 (set in conftest)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import HANG_GUARD_S, make_trainer

from srm_hf.fused import srm_targets_fused, srm_targets_projected, triton_available, use_fused
from srm_hf.srm import SparseCoder, project, srm_loss, srm_loss_fused, srm_targets, top_k_mask

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (non-CUDA torch build)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LAYOUTS = {  # name -> (shape of a [N, K, ...] / [N, L, K] / [N, K] tensor, channel dim)
    "maps": ((3, 10, 5, 6), 1),
    "maps, channels last": ((3, 10, 5, 6), 1),
    "tokens": ((3, 7, 10), -1),
    "vectors": ((4, 10), -1),
    "maps of 289 pixels": ((2, 40, 17, 17), 1),  # several programs per image, several blocks per program
    "tokens, K a power of two": ((2, 5, 8), -1),  # no padded atoms
}


def layout(name: str, x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if name == "maps, channels last" else x


def eager_targets(a: torch.Tensor, k: int, dim: int):
    """`SparseCoder.targets` after the projection a: the k largest a kept, their sigmoid the codes."""
    return srm_targets(torch.sigmoid(a.float()) * top_k_mask(a.float(), k, dim))


def assert_fused_loss_equals_eager(logits: torch.Tensor, pixel: torch.Tensor, image: torch.Tensor) -> None:
    """The fused terms equal the eager ones, and so does the gradient of their sum, to 1e-5 relative."""
    want, got = srm_loss(logits, pixel, image), srm_loss_fused(logits, pixel, image)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    want_grad, = torch.autograd.grad(sum(want.values()), logits)
    got_grad, = torch.autograd.grad(sum(got.values()), logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


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


def test_a_coder_gives_the_same_targets_fused_and_eager():
    torch.manual_seed(0)
    coder = SparseCoder(in_channels=6, num_atoms=12, num_active=2).to(DEVICE)
    x = torch.randn(2, 6, 4, 4, device=DEVICE)
    fused, eager = coder.targets(x, fused=True), coder.targets(x)
    assert torch.equal(fused[0], eager[0])
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-6, atol=1e-7)


PROJECTED = {  # name -> teacher features of C = 20 channels (not a multiple of the 16 a dot block takes)
    "maps": (3, 20, 5, 6),
    "maps, channels last": (3, 20, 5, 6),
    "tokens": (3, 7, 20),
    "vectors": (4, 20),
    "maps of 289 pixels": (2, 20, 17, 17),
}


def integer_coder(channels: int, atoms: int, k: int, seed: int) -> SparseCoder:
    """A coder whose projection Dᵀt + b of integer features is exact in float32, TF32 and any order of summation:
    atoms of small integers / 8 (a of a few units: the sigmoid does not saturate), b = 0.5; atoms j and j + K/2
    equal, so every pixel's largest value is tied."""
    coder = SparseCoder(channels, atoms, k)
    half = torch.randint(-2, 3, (channels, atoms // 2), generator=torch.Generator().manual_seed(seed)) / 8
    with torch.no_grad():
        coder.dictionary.copy_(torch.cat([half, half], dim=1))
        coder.bias.fill_(0.5)
    return coder.to(DEVICE)


@pytest.mark.parametrize("name", PROJECTED)
@pytest.mark.parametrize("atoms, k", [(40, 1), (40, 3), (300, 7)])  # 300 atoms: a block of 512, the widest
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


def test_wider_dictionaries_project_with_torch_first():
    """K > 512 atoms would crowd the kernel's shared memory: the coder projects with torch, then the targets kernel."""
    coder = integer_coder(20, 600, 5, seed=0)
    t = torch.randint(-3, 4, (2, 20, 4, 4), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    assert srm_targets_projected(t, coder.dictionary, coder.bias, 5) is None
    got, want = coder.targets(t, fused=True), coder.targets(t)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)


def test_the_projection_in_the_kernel_uses_tf32_where_torch_would(monkeypatch):
    """cuDNN convolutions (maps) use TF32 by default, matmuls (tokens, vectors) only when allowed: the kernel's dot
    follows the same switches."""
    from srm_hf import fused

    seen = []
    launch = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda kernel, grid, *args, **meta: (seen.append(meta["PRECISION"]),
                                                                               launch(kernel, grid, *args, **meta)))
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


def test_features_that_do_not_fit_the_dictionary_are_refused():
    coder = integer_coder(20, 40, 2, seed=0)
    with pytest.raises(ValueError, match=r"features \(2, 24, 3, 3\) have 24 channels, the dictionary \(20, 40\) 20"):
        srm_targets_projected(torch.zeros(2, 24, 3, 3, device=DEVICE), coder.dictionary, coder.bias, 2)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("on_sigmoid", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 0.0), (0.0, 2.0)])
def test_fused_loss_and_gradient_equal_the_eager_ones(name, on_sigmoid, weights):
    shape, dim = LAYOUTS[name]
    g = torch.Generator().manual_seed(1)
    logits = layout(name, 2 * torch.randn(shape, generator=g).to(DEVICE)).requires_grad_()
    pixel, image = eager_targets(torch.randn(shape, generator=g).to(DEVICE), 2, dim)
    want = srm_loss(logits, pixel, image, *weights, pixel_ce_on_sigmoid=on_sigmoid)
    got = srm_loss_fused(logits, pixel, image, *weights, pixel_ce_on_sigmoid=on_sigmoid)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    outer = {"pixel": 3.0, "image": -2.0}  # gradients of the terms other than 1, as a weighted sum of them gives
    want_grad, = torch.autograd.grad(sum(outer[k] * v for k, v in want.items()), logits)
    got_grad, = torch.autograd.grad(sum(outer[k] * v for k, v in got.items()), logits)
    assert got_grad.shape == logits.shape and got_grad.stride() == logits.stride()
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


def test_fused_loss_where_the_image_prediction_saturates():
    """Atoms whose sigmoid is 1 or 0 at every pixel: ḡ is clamped, and the clamp stops their image gradient."""
    g = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(2, 10, 4, 5, generator=g)
    logits[:, :3], logits[:, 3:5] = 40.0, -120.0  # sigmoid: 1.0 and 0.0 in float32
    logits = logits.to(DEVICE).requires_grad_()
    pixel, image = eager_targets(torch.randn(2, 10, 4, 5, generator=g).to(DEVICE), 2, 1)
    image[:, 3] = 0.5  # a label the saturated prediction cannot reach: a large gradient, were it not clamped
    want, got = srm_loss(logits, pixel, image), srm_loss_fused(logits, pixel, image)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    want_grad, = torch.autograd.grad(want["image"], logits)
    got_grad, = torch.autograd.grad(got["image"], logits)
    assert want_grad[:, :5].abs().max() == 0  # the eager clamp's zero gradient
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("left_out", ["image", "pixel"])
def test_a_term_of_weight_zero_is_left_out_of_the_gradient(left_out):
    """As in the eager loss, a term of weight 0 adds nothing, not 0 × NaN: a NaN image label (or an infinite
    logit under the raw-logit CE) in a term that is switched off leaves the gradient finite."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 10, 3, 4, generator=g)
    pixel, image = eager_targets(torch.randn(2, 10, 3, 4, generator=g), 2, 1)
    if left_out == "image":
        image[0, 1], weights, on_sigmoid = float("nan"), (1.0, 0.0), True
    else:
        logits[0, 1, 0, 0], weights, on_sigmoid = float("inf"), (0.0, 1.0), False
    logits = logits.to(DEVICE).requires_grad_()
    pixel, image = pixel.to(DEVICE), image.to(DEVICE)
    want = srm_loss(logits, pixel, image, *weights, pixel_ce_on_sigmoid=on_sigmoid)
    got = srm_loss_fused(logits, pixel, image, *weights, pixel_ce_on_sigmoid=on_sigmoid)
    want_grad, = torch.autograd.grad(sum(want.values()), logits)
    got_grad, = torch.autograd.grad(sum(got.values()), logits)
    assert want_grad.isfinite().all() and got_grad.isfinite().all()
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


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


@pytest.mark.parametrize("shape", [(2, 6, 12, 12), (3, 1100)])
def test_the_per_image_sums_walk_many_chunks_and_wide_dictionaries(monkeypatch, shape):
    """The kernel that finishes a tap's loss per image reads its partial sums in blocks of at most 128 programs and
    1,024 atoms: 144 programs per image (one pixel each), and 1,100 atoms, take two blocks."""
    from srm_hf import fused

    monkeypatch.setattr(fused, "PIXELS_PER_PROGRAM", 1)
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(shape, generator=g).to(DEVICE).requires_grad_()
    assert fused.launch_for(fused.pixel_view(logits)).chunks == (144 if len(shape) == 4 else 1)
    pixel, image = eager_targets(torch.randn(shape, generator=g).to(DEVICE), 2, 1 if len(shape) == 4 else -1)
    assert_fused_loss_equals_eager(logits, pixel, image)


def test_pixel_labels_that_do_not_fit_the_logits_are_refused_before_a_kernel_reads_them():
    logits = torch.randn(2, 10, 5, 6, device=DEVICE, requires_grad=True)
    pixel, image = eager_targets(torch.randn(2, 10, 5, 5, device=DEVICE), 2, 1)  # a 5×5 grid for 5×6 logits
    with pytest.raises(ValueError, match=r"pixel_labels \(2, 5, 5\) do not give one label per pixel"):
        srm_loss_fused(logits, pixel, image)


def test_image_labels_broadcast_as_in_eager_and_other_sizes_are_refused():
    logits = torch.randn(2, 8, 3, 3, device=DEVICE, requires_grad=True)
    pixel, image = eager_targets(torch.randn(2, 8, 3, 3, device=DEVICE), 2, 1)
    one_row = image[:1]  # [1, K]: both images compared with the first one's labels
    want, got = srm_loss(logits, pixel, one_row)["image"], srm_loss_fused(logits, pixel, one_row)["image"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"image_labels \(2, 4\) do not give one label per atom"):
        srm_loss_fused(logits, pixel, image[:, :4])


def test_the_fused_terms_can_be_changed_in_place_like_the_eager_ones():
    """An overridden `tap_loss` may scale a term in place: the terms are tensors of their own, not views."""
    logits = torch.randn(2, 8, 3, 3, device=DEVICE, requires_grad=True)
    pixel, image = eager_targets(torch.randn(2, 8, 3, 3, device=DEVICE), 2, 1)
    want, got = srm_loss(logits, pixel, image), srm_loss_fused(logits, pixel, image)
    for terms in (want, got):
        terms["pixel"] *= 3.0
        terms["image"] += 1.0
    want_grad, = torch.autograd.grad(sum(want.values()), logits)
    got_grad, = torch.autograd.grad(sum(got.values()), logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


def test_small_maps_get_enough_programs_and_large_maps_long_runs():
    from srm_hf.fused import MIN_PROGRAMS, PIXELS_PER_PROGRAM, launch_for, pixel_view

    def programs(shape):
        plan = launch_for(pixel_view(torch.empty(shape, device="meta")))
        return shape[0] * plan.chunks, plan.per_program

    assert programs((128, 1024, 7, 7)) == (128 * 13, 4)  # ResNet layer4 at 224 px: was one program per image
    assert programs((16, 512, 7, 7)) == (16 * 7, 8)  # as many as one block per program gives
    assert programs((128, 128, 56, 56)) == (128 * 13, PIXELS_PER_PROGRAM)  # layer1: long runs, few partial sums
    assert programs((128, 256, 28, 28))[0] >= MIN_PROGRAMS


def test_the_fused_loss_of_a_tap_is_one_autograd_node():
    """Both terms, weights, the per-image mean and the BCE in one node: no chain of small ops per tap to launch."""
    logits = torch.randn(2, 10, 5, 6, device=DEVICE, requires_grad=True)
    pixel, image = eager_targets(torch.randn(2, 10, 5, 6, device=DEVICE), 2, 1)
    got = srm_loss_fused(logits, pixel, image, 0.5, 2.0)
    node = got["pixel"].grad_fn
    assert node is got["image"].grad_fn
    assert [type(f).__name__ for f, _ in node.next_functions if f is not None] == ["AccumulateGrad"]


def test_fused_loss_reads_strided_tokens_and_low_precision_logits():
    """A token slice (class token dropped) is read through its strides; bf16 logits are upcast inside the kernel
    and the gradient comes back in bf16."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 9, 8, generator=g).to(DEVICE)
    pixel, image = eager_targets(torch.randn(2, 8, 8, generator=g).to(DEVICE), 2, -1)
    for logits in (tokens[:, 1:], tokens.bfloat16()[:, 1:]):
        logits = logits.detach().requires_grad_()
        want = srm_loss(logits, pixel, image)
        got = srm_loss_fused(logits, pixel, image)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
        want_grad, = torch.autograd.grad(sum(want.values()), logits)
        got_grad, = torch.autograd.grad(sum(got.values()), logits)
        assert got_grad.dtype == logits.dtype
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2 if logits.dtype == torch.bfloat16
                                   else 1e-5, atol=1e-6)


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
    runs = {}
    for kernels in ("eager", "triton"):
        trainer = make_trainer(tmp_path / kernels, srm_mode=mode, srm_kernels=kernels, max_steps=3,
                               srm_dictionary_max_steps=2, srm_max_steps=3)
        trainer.train()
        runs[kernels] = ([e["loss"] for e in trainer.state.log_history if "loss" in e],
                         {k: v.clone() for k, v in trainer.distill_model.student.state_dict().items()})
    torch.testing.assert_close(runs["triton"][0], runs["eager"][0], rtol=1e-5, atol=1e-6)
    for key, value in runs["eager"][1].items():
        torch.testing.assert_close(runs["triton"][1][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PROJECTED)
@pytest.mark.parametrize("on_sigmoid", [True, False])
@pytest.mark.parametrize("weights, atoms", [((1.0, 1.0), 40), ((0.5, 0.0), 40), ((0.0, 2.0), 40), ((0.7, 1.3), 200)])
def test_the_loss_through_the_head_in_the_kernels_equals_the_eager_one(name, on_sigmoid, weights, atoms):
    """`srm_loss_projected`: the head's logits Pᵀs + c made inside the loss kernels give `srm_loss(head(s))`'s terms,
    and the same gradients in s, P and c, to 1e-5 relative (200 atoms: a block of 256, the widest it takes)."""
    from srm_hf.srm import SRMHead, srm_loss_projected

    g = torch.Generator().manual_seed(atoms)
    head = SRMHead(20, atoms).to(DEVICE)
    shape = PROJECTED[name]
    a = torch.randn(*((shape[0], atoms, *shape[2:]) if len(shape) == 4 else (*shape[:-1], atoms)), generator=g)
    pixel, image = eager_targets(a.to(DEVICE), 3, 1 if len(shape) == 4 else -1)
    features = layout(name, torch.randn(shape, generator=g)).to(DEVICE)
    results = []
    for projected in (False, True):
        s = features.clone().requires_grad_()
        head.zero_grad()
        terms = srm_loss_projected(s, head, pixel, image, *weights, on_sigmoid) if projected else \
            srm_loss(head(s), pixel, image, *weights, on_sigmoid)
        (1.5 * sum(terms.values())).backward()
        results.append((terms, s.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    (want, *want_grads), (got, *got_grads) = results
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    assert got_grads[0].stride() == features.stride()
    for g_got, g_want in zip(got_grads, want_grads):  # s, P, c
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)


def test_the_loss_through_the_head_from_bf16_features_under_autocast():
    """bf16 student features under autocast: the gradient in s comes in bf16 (the features' dtype), those in P and c in
    float32, all near the eager bf16 path's (which rounds the logits to bf16 and this path does not)."""
    from srm_hf.srm import SRMHead, srm_loss_projected

    torch.manual_seed(3)
    head = SRMHead(24, 48).to(DEVICE)
    pixel, image = eager_targets(torch.randn(4, 48, 6, 6, device=DEVICE), 2, 1)
    features = torch.randn(4, 24, 6, 6, device=DEVICE).bfloat16()
    results = []
    for projected in (False, True):
        s = features.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            terms = srm_loss_projected(s, head, pixel, image) if projected else srm_loss(head(s), pixel, image)
        results.append(torch.autograd.grad(sum(terms.values()), [s, head.weight, head.bias]))
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=2e-3)


def test_the_srm_method_takes_the_head_into_the_kernels_unless_its_extension_points_are_overridden(tmp_path):
    """The fused SRM loss of a tap goes through `projected_tap_loss` (no head logits in memory); a subclass that
    overrides `head_logits` or `tap_loss` has them called instead, and wider heads, other grids and the eager choice
    go the usual way."""
    from srm_hf.methods.srm import SRM

    class Probe(SRM):
        def head_logits(self, pair, feature):
            return super().head_logits(pair, feature)

    for method_class, kernels, projected in ((SRM, "triton", True), (Probe, "triton", False), (SRM, "eager", False)):
        trainer = make_trainer(tmp_path / kernels, srm_mode="joint", srm_kernels=kernels, max_steps=1)
        method = trainer.method
        if method_class is Probe:
            method.__class__ = Probe
        pair = method.pairs[0]
        feature = torch.randn(2, pair.student.channels, *pair.teacher.spatial, device=DEVICE)
        labels = eager_targets(torch.randn(2, method.heads[pair.key].num_atoms, *pair.teacher.spatial,
                                           device=DEVICE), 2, 1)
        assert (method.projected_tap_loss(pair, feature, *labels) is not None) is projected
    smaller = torch.randn(2, pair.student.channels, *(s - 1 for s in pair.teacher.spatial), device=DEVICE)
    trainer = make_trainer(tmp_path / "resized", srm_mode="joint", srm_kernels="triton", max_steps=1)
    assert trainer.method.projected_tap_loss(trainer.method.pairs[0], smaller, *labels) is None  # resized: eager


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("projected", [True, False], ids=["projection in the kernel", "projection by torch"])
def test_fused_codes_and_dictionary_gradients_equal_the_eager_ones(name, projected, monkeypatch):
    """Stage 1 through the kernels: the same codes (ties included) and the same gradients of MSE(T, D·λ) in D, b and
    T. Features and atoms on a grid of 1/2 and 1/8 make every projection exact, so equal atoms tie exactly."""
    from srm_hf import fused

    if not projected:
        monkeypatch.setattr(fused, "PROJECTED_MAX_ATOMS", 4)  # as for K > 512: torch projects, then the codes kernel
    shape, dim = LAYOUTS[name]
    channels = 5
    x_shape = (shape[0], channels, *shape[2:]) if dim == 1 else (*shape[:-1], channels)
    torch.manual_seed(0)
    coder = SparseCoder(channels, shape[dim], num_active=3).to(DEVICE)
    with torch.no_grad():
        half = coder.num_atoms // 2
        coder.dictionary.copy_((coder.dictionary * 8).round() / 8)
        coder.dictionary[:, half:2 * half] = coder.dictionary[:, :half]  # duplicated atoms: ties at every pixel
    x = layout(name, (torch.randint(-4, 5, x_shape) / 2).to(DEVICE)).requires_grad_()
    results = []
    for fused_path in (False, True):
        coder.zero_grad()
        x.grad = None
        codes, reconstruction = coder(x, fused=fused_path)
        mse = ((reconstruction - x) ** 2).mean()
        mse.backward()
        results.append((codes.detach(), mse.detach(), coder.dictionary.grad.clone(), coder.bias.grad.clone(),
                        x.grad.clone()))
    (codes, loss, *grads), (f_codes, f_loss, *f_grads) = results
    assert f_codes.stride() == codes.stride()
    assert torch.equal(f_codes != 0, codes != 0) and (codes != 0).sum(dim).eq(3).all()
    torch.testing.assert_close(f_codes, codes, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-7)
    for got, want in zip(f_grads, grads):  # D, b, the features
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["maps", "maps, channels last", "tokens"])
def test_codes_projected_in_the_kernel_come_as_torch_s_projection_gives_them(name):
    """Under autocast the codes have autocast's dtype (torch's projection would give it) and the features' layout,
    and keep the atoms eager bf16 keeps wherever bf16's rounding of a does not reorder them."""
    shape, _ = LAYOUTS[name]
    coder = SparseCoder(6, shape[1 if len(shape) == 4 else -1], num_active=2).to(DEVICE)
    x_shape = (shape[0], 6, *shape[2:]) if len(shape) == 4 else (*shape[:-1], 6)
    x = layout(name, torch.randn(x_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = coder.encode(x, fused=True), coder.encode(x)
    assert got.dtype == want.dtype == torch.bfloat16 and got.stride() == want.stride()
    assert ((got != 0) == (want != 0)).float().mean() > 0.95


@pytest.mark.parametrize("name", PROJECTED)
@pytest.mark.parametrize("atoms, k", [(40, 3), (200, 7)])  # 200 atoms: a block of 256, the widest stage 1 takes
def test_stage_one_in_two_kernels_equals_the_eager_loss_and_gradients(name, atoms, k):
    """`dictionary_loss_projected`: MSE(D λ, t) and its gradients in D and b as the eager coder and `dictionary_loss`
    give them, ties included (exact integer features, atoms on a grid of 1/8, equal atoms in pairs)."""
    from srm_hf.fused_dictionary import dictionary_loss_projected
    from srm_hf.srm import dictionary_loss

    coder = integer_coder(20, atoms, k, seed=atoms)
    t = layout(name, torch.randint(-3, 4, PROJECTED[name], generator=torch.Generator().manual_seed(k)).float())
    t = t.to(DEVICE)
    results = []
    for fused_path in (False, True):
        coder.zero_grad()
        loss = dictionary_loss_projected(t, coder.dictionary, coder.bias, k) if fused_path else \
            dictionary_loss(t, coder(t)[1])
        (2.5 * loss).backward()
        results.append((loss.detach(), coder.dictionary.grad.clone(), coder.bias.grad.clone()))
    (loss, grad_d, grad_b), (f_loss, f_grad_d, f_grad_b) = results
    assert f_loss.dtype == torch.float32 and f_loss.dim() == 0
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(f_grad_d, grad_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_grad_b, grad_b, rtol=1e-5, atol=1e-6)


def test_stage_one_in_two_kernels_from_bf16_maps_under_autocast():
    """bf16 teacher maps under autocast, as a bf16 run trains stage 1: the loss and gradients of the float32 maths on
    the same maps within bf16's rounding of the stored codes and gradients (the eager bf16 path rounds more)."""
    from srm_hf.fused_dictionary import dictionary_loss_projected
    from srm_hf.srm import dictionary_loss

    torch.manual_seed(2)
    coder = SparseCoder(24, 48, 3).to(DEVICE)
    t = torch.randn(4, 24, 7, 7, device=DEVICE).relu().bfloat16()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = dictionary_loss_projected(t, coder.dictionary, coder.bias, 3)
    got = torch.autograd.grad(loss, [coder.dictionary, coder.bias])
    want_loss = dictionary_loss(t.float(), coder(t.float())[1])
    want = torch.autograd.grad(want_loss, [coder.dictionary, coder.bias])
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=1e-5)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=3e-2, atol=1e-4)


def test_stage_one_in_two_kernels_applies_only_where_it_can():
    """Wider dictionaries and features that need a gradient themselves go the other way (codes kernel, torch's
    convolutions); the coder's `reconstruction_loss` gives the same loss either way."""
    from srm_hf.fused_dictionary import DICTIONARY_MAX_ATOMS, dictionary_loss_projected

    wide = integer_coder(20, 2 * DICTIONARY_MAX_ATOMS, 3, seed=0)
    t = torch.randint(-3, 4, (2, 20, 3, 3), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    assert dictionary_loss_projected(t, wide.dictionary, wide.bias, 3) is None
    narrow = integer_coder(20, 40, 3, seed=0)
    assert dictionary_loss_projected(t.clone().requires_grad_(), narrow.dictionary, narrow.bias, 3) is None
    for coder in (wide, narrow):
        torch.testing.assert_close(coder.reconstruction_loss(t, fused=True), coder.reconstruction_loss(t),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_layout", ["same as the codes", "another"])
def test_the_codes_gradient_kernel_reads_any_gradient_layout(grad_layout):
    from srm_hf.fused_dictionary import sparse_codes_fused

    a = torch.randn(2, 12, 5, 6, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 12, 5, 6, device=DEVICE)
    grad = grad.to(memory_format=torch.channels_last) if grad_layout == "same as the codes" else grad
    codes = sparse_codes_fused(a, 3)
    got, = torch.autograd.grad(codes, a, grad)
    mask = top_k_mask(a.detach(), 3, 1)
    want, = torch.autograd.grad(torch.sigmoid(a) * mask, a, grad)
    assert got.stride() == a.stride()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [*LAYOUTS, "maps in bf16", "float32 maps, a bf16 reconstruction"])
def test_the_fused_dictionary_loss_equals_the_eager_one(name):
    """Stage 1's MSE(T, T̂) read in place (bf16 too): the same value and gradient in T̂ as the float32 `F.mse_loss`."""
    from srm_hf.srm import dictionary_loss

    shape, _ = LAYOUTS.get(name, LAYOUTS["maps"])
    g = torch.Generator().manual_seed(7)
    features = layout(name, torch.randn(shape, generator=g).to(DEVICE))
    reconstruction = layout(name, torch.randn(shape, generator=g).to(DEVICE))
    if "bf16" in name:
        reconstruction = reconstruction.bfloat16()
        features = features.bfloat16() if name == "maps in bf16" else features
    reconstruction.requires_grad_()
    want, got = dictionary_loss(features, reconstruction), dictionary_loss(features, reconstruction, fused=True)
    assert got.grad_fn is not None and "MeanSquaredError" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    (want_grad,), (got_grad,) = (torch.autograd.grad(3.0 * loss, reconstruction) for loss in (want, got))
    assert got_grad.dtype == reconstruction.dtype and got_grad.stride() == reconstruction.stride()
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-2 if "bf16" in name else 1e-5, atol=1e-7)


def test_the_fused_dictionary_loss_carries_nan_and_leaves_empty_batches_to_torch():
    from srm_hf.srm import dictionary_loss

    features, reconstruction = torch.randn(2, 6, 3, 4, device=DEVICE), torch.randn(2, 6, 3, 4, device=DEVICE)
    features[1, 2, 0, 0] = float("nan")
    reconstruction.requires_grad_()
    loss = dictionary_loss(features, reconstruction, fused=True)
    grad, = torch.autograd.grad(loss, reconstruction)
    assert loss.isnan() and grad[1, 2, 0, 0].isnan() and grad.isfinite().sum() == grad.numel() - 1
    empty = torch.empty(0, 6, 3, 4, device=DEVICE)
    assert dictionary_loss(empty, empty.clone().requires_grad_(), fused=True).isnan()


def test_the_fused_dictionary_loss_falls_back_where_layouts_differ():
    from srm_hf.srm import dictionary_loss

    features = torch.randn(2, 6, 3, 4, device=DEVICE)
    reconstruction = torch.randn(2, 6, 3, 4, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    got = dictionary_loss(features, reconstruction, fused=True)
    assert "MeanSquaredError" not in type(got.grad_fn).__name__
    torch.testing.assert_close(got, dictionary_loss(features, reconstruction))


def test_a_kernel_that_does_not_compile_names_the_eager_switch():
    from triton.runtime.errors import OutOfResources

    from srm_hf.fused import _run, launch_for, pixel_view

    class Kernel:
        fn = srm_targets_fused

        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise OutOfResources(99, 1, "shared memory")
            return launch

    with pytest.raises(RuntimeError, match="srm_targets_fused does not compile.*srm_kernels='eager'"):
        view = pixel_view(torch.zeros(2, 4))
        _run(Kernel(), view, launch_for(view))


def test_every_kernel_compiles_for_a_cuda_gpu():
    """Triton's compiler and ptxas, for sm_90, without a GPU: what the interpreter accepts must also compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "compile_kernels.py")], env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "cubin bytes" in line]
    assert len(lines) == 31 and all(int(line.split()[-1]) > 0 for line in lines)
    projected = [line.split() for line in lines if line.startswith(("projected_", "dictionary_"))]
    assert len(projected) == 18  # the dot kernels: no register spills, under 40 kB of shared memory (GPUs since 2020)
    assert all(words[words.index("spill") + 2] == "0" and int(words[words.index("shared") + 1]) < 40 * 1024
               for words in projected)
