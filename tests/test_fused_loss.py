"""The student's SRM loss through the fused kernels (srm_hf.fused_loss), from head logits or with the head's projection
inside the kernels, against the eager `srm_loss`: terms and gradients to 1e-5 relative in every layout."""

import pytest
import torch
from conftest import make_trainer
from fused_helpers import (DEVICE, LAYOUTS, PROJECTED, assert_fused_loss_equals_eager, eager_targets, layout,
                           requires_triton)

from srm_hf.srm import srm_loss, srm_loss_fused

pytestmark = [requires_triton, pytest.mark.usefixtures("ieee_float32")]  # TF32 is tested on its own


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


@pytest.mark.parametrize("shape", [(2, 6, 12, 12), (3, 1100)])
def test_the_per_image_sums_walk_many_chunks_and_wide_dictionaries(monkeypatch, shape):
    """The last program of each image sums the partial sums of all its programs, row after row: 144 programs per
    image (one pixel each), and 1,100 atoms (a block of 2,048)."""
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
    with pytest.raises(ValueError, match="image_labels require grad"):  # eager would give them a gradient
        srm_loss_fused(logits, pixel, image.clone().requires_grad_())


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


@pytest.mark.parametrize("name", PROJECTED)
@pytest.mark.parametrize("on_sigmoid", [True, False])
@pytest.mark.parametrize("weights, atoms", [((1.0, 1.0), 40), ((0.5, 0.0), 40), ((0.0, 2.0), 40), ((0.7, 1.3), 200),
                                             ((1.0, 1.0), 300), ((0.0, 2.0), 300), ((0.4, 1.1), 700),
                                             ((0.5, 0.0), 700)])
def test_the_loss_through_the_head_in_the_kernels_equals_the_eager_one(name, on_sigmoid, weights, atoms):
    """`srm_loss_projected`: the head's logits Pᵀs + c made inside the loss kernels give `srm_loss(head(s))`'s terms,
    and the same gradients in s, P and c, to 1e-5 relative (200 atoms: one block of 256; 300 and 700: two and three
    blocks, the log-sum-exp kept across them)."""
    from srm_hf.srm import SRMHead, srm_loss_projected

    g = torch.Generator().manual_seed(atoms)
    torch.manual_seed(atoms)  # the head's initial weights: the same whatever ran before
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
    for g_got, g_want in zip(got_grads[:2], want_grads[:2]):  # s, P
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    # dL/dc sums every dL/dl, which cancel to ~0 where the CE is on the logits and the image weight is 0 (softmax -
    # one-hot sums to 0 per pixel): there only its absolute error means anything
    torch.testing.assert_close(got_grads[2], want_grads[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("atoms", [48, 300])  # one block of atoms; two, dL/dl read back in bf16
def test_the_loss_through_the_head_from_bf16_features_under_autocast(atoms):
    """bf16 student features under autocast: the gradient in s comes in bf16 (the features' dtype), those in P and c in
    float32, all near the eager bf16 path's (which rounds the logits to bf16 and this path does not)."""
    from srm_hf.srm import SRMHead, srm_loss_projected

    torch.manual_seed(3)
    head = SRMHead(24, atoms).to(DEVICE)
    pixel, image = eager_targets(torch.randn(4, atoms, 6, 6, device=DEVICE), 2, 1)
    features = torch.randn(4, 24, 6, 6, device=DEVICE).bfloat16()
    results = []
    for projected in (False, True):
        s = features.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            terms = srm_loss_projected(s, head, pixel, image) if projected else srm_loss(head(s), pixel, image)
        results.append(torch.autograd.grad(sum(terms.values()), [s, head.weight, head.bias]))
    for got, want in zip(results[1], results[0]):  # s, P, c
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=2e-2 * want.abs().max().item())


def test_the_srm_method_takes_the_head_into_the_kernels_unless_its_extension_points_are_overridden(tmp_path):
    """The fused SRM loss of a tap goes through `projected_tap_loss` (no head logits in memory); a method that
    overrides `head_logits` or `tap_loss`, or a head with a forward hook, has them called instead, and so do other
    grids, the eager choice and torch's projections (`srm_kernel_projections=False`, the default)."""
    from srm_hf.methods.srm import SRM

    class OwnHeadLogits(SRM):
        def head_logits(self, pair, feature):
            return super().head_logits(pair, feature)

    class OwnTapLoss(SRM):
        def tap_loss(self, pair, head_logits, pixel_labels, image_labels):
            return super().tap_loss(pair, head_logits, pixel_labels, image_labels)

    cases = {"plain": (SRM, "triton", True), "head_logits": (OwnHeadLogits, "triton", False),
             "tap_loss": (OwnTapLoss, "triton", False), "hooked head": (SRM, "triton", False),
             "eager": (SRM, "eager", False), "resized": (SRM, "triton", False),
             "torch's projections": (SRM, "triton", False)}
    for name, (method_class, kernels, projected) in cases.items():
        method = make_trainer(tmp_path / name.replace(" ", "_").replace("'", ""), srm_mode="joint",
                              srm_kernels=kernels, max_steps=1).method
        assert not method.kernel_projections  # the default
        method.kernel_projections = name != "torch's projections"
        method.__class__ = method_class
        method.to(DEVICE)  # the trainer's model stays on the CPU (use_cpu) until it trains
        pair = method.pairs[0]
        if name == "hooked head":
            method.heads[pair.key].register_forward_hook(lambda module, args, out: out)
        grid = tuple(s - 1 for s in pair.teacher.spatial) if name == "resized" else pair.teacher.spatial
        feature = torch.randn(2, pair.student.channels, *grid, device=DEVICE)
        atoms = method.heads[pair.key].num_atoms
        labels = eager_targets(torch.randn(2, atoms, *pair.teacher.spatial, device=DEVICE), 2, 1)
        assert (method.projected_tap_loss(pair, feature, *labels) is not None) is projected, name
