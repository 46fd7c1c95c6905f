"""Stage 1 through the fused kernels (srm_hf.fused_dictionary): the sparse codes, the MSE and the whole tap in two
kernels and a matmul, against the eager coder and `dictionary_loss`, ties included."""

import pytest
import torch
from fused_helpers import DEVICE, LAYOUTS, PROJECTED, integer_coder, layout, requires_triton

from srm_hf.srm import SparseCoder, top_k_mask

pytestmark = [requires_triton, pytest.mark.usefixtures("ieee_float32")]  # TF32 is tested on its own


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
        got, want = coder.encode(x, fused=True, projected=True), coder.encode(x)
    assert got.dtype == want.dtype == torch.bfloat16 and got.stride() == want.stride()
    assert ((got != 0) == (want != 0)).float().mean() > 0.95


@pytest.mark.parametrize("name", PROJECTED)
@pytest.mark.parametrize("atoms, k", [(40, 3), (200, 7), (300, 7), (600, 20)])
def test_stage_one_in_two_kernels_equals_the_eager_loss_and_gradients(name, atoms, k):
    """`dictionary_loss_projected`: MSE(D λ, t) and its gradients in D and b as the eager coder and `dictionary_loss`
    give them, ties included (exact integer features, atoms on a grid of 1/8, equal atoms in pairs). 200 atoms: one
    block of 256, the widest the one-block kernels take; 300 and 600: the wide kernels, with atoms tied across blocks
    (j and j + K/2) and a part-padded last block."""
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
        if fused_path:  # the codes the forward kernel wrote (pixel-major), as the eager coder keeps them
            want = coder.encode(t).detach()
            want = want.movedim(1, -1) if t.dim() == 4 else want
            codes = loss.grad_fn.saved_tensors[2][0].view(want.shape)
            assert torch.equal(codes != 0, want != 0)
            torch.testing.assert_close(codes, want, rtol=1e-6, atol=1e-7)
        (2.5 * loss).backward()
        results.append((loss.detach(), coder.dictionary.grad.clone(), coder.bias.grad.clone()))
    (loss, grad_d, grad_b), (f_loss, f_grad_d, f_grad_b) = results
    assert f_loss.dtype == torch.float32 and f_loss.dim() == 0
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(f_grad_d, grad_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_grad_b, grad_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("atoms", [48, 300])
def test_stage_one_in_two_kernels_from_bf16_maps_under_autocast(atoms):
    """bf16 teacher maps under autocast, as a bf16 run trains stage 1: the loss and gradients of the float32 maths on
    the same maps within bf16's rounding of the stored codes and gradients (the eager bf16 path rounds more)."""
    from srm_hf.fused_dictionary import dictionary_loss_projected
    from srm_hf.srm import dictionary_loss

    torch.manual_seed(2)
    coder = SparseCoder(24, atoms, 3).to(DEVICE)
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
    """More than WIDE_MAX_ACTIVE atoms kept of a wide dictionary, and features that need a gradient themselves, go the
    other way (codes kernel, torch's convolutions); the coder's `reconstruction_loss` gives the same loss either way."""
    from srm_hf.fused import WIDE_MAX_ACTIVE
    from srm_hf.fused_dictionary import DICTIONARY_MAX_ATOMS, dictionary_loss_projected

    dense = integer_coder(20, 2 * DICTIONARY_MAX_ATOMS, WIDE_MAX_ACTIVE + 1, seed=0)
    t = torch.randint(-3, 4, (2, 20, 3, 3), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    assert dictionary_loss_projected(t, dense.dictionary, dense.bias, dense.num_active) is None
    narrow = integer_coder(20, 40, 3, seed=0)
    assert dictionary_loss_projected(t.clone().requires_grad_(), narrow.dictionary, narrow.bias, 3) is None
    for coder in (dense, narrow):
        for projected in (False, True):
            torch.testing.assert_close(coder.reconstruction_loss(t, fused=True, projected=projected),
                                       coder.reconstruction_loss(t), rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over a pixel of NaN
@pytest.mark.parametrize("atoms", [40, 300])
def test_stage_one_in_two_kernels_carries_a_nan_pixel(atoms):
    """A teacher map with a NaN gives a NaN loss, as the eager maths does, in one block of atoms or several."""
    from srm_hf.fused_dictionary import dictionary_loss_projected

    coder = integer_coder(20, atoms, 3, seed=1)
    t = torch.randint(-3, 4, (2, 20, 3, 3), generator=torch.Generator().manual_seed(1)).float().to(DEVICE)
    t[1, 4, 2, 0] = float("nan")
    assert dictionary_loss_projected(t, coder.dictionary, coder.bias, 3).isnan()
    assert coder.reconstruction_loss(t).isnan()


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


def test_stage_one_walks_the_batch_as_one_image_where_its_layout_allows():
    """Stage 1's sums do not distinguish images: vectors (one pixel per image), channels_last maps and dense tokens
    are walked as one image of N·S pixels, so that blocks of pixels are full; channels-first maps, whose images do not
    follow each other at the pixel stride, keep one image per image. The losses are those of the eager coder."""
    from srm_hf.fused_dictionary import dictionary_loss_projected, dictionary_plan
    from srm_hf.srm import dictionary_loss

    coder = integer_coder(20, 300, 5, seed=2)
    shapes = {"vectors": (40, 20), "tokens": (6, 7, 20), "maps, channels last": (6, 20, 5, 6), "maps": (6, 20, 5, 6)}
    for name, shape in shapes.items():
        t = layout(name, torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(2)).float().to(DEVICE))
        view, launch = dictionary_plan(t, coder.dictionary, 5)
        images = shape[0]
        assert (view.n, view.pixels) == ((images, t.numel() // (20 * images)) if name == "maps" else
                                         (1, t.numel() // 20))
        assert launch.chunks == -(-view.pixels // launch.per_program)
        torch.testing.assert_close(dictionary_loss_projected(t, coder.dictionary, coder.bias, 5),
                                   dictionary_loss(t, coder(t)[1]), rtol=1e-5, atol=1e-7)
