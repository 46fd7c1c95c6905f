"""The student's SRM loss of one tap through the Triton kernels of `srm_hf.fused_loss_kernels`, forward and backward,
as one autograd node, with no K-channel float32 map:

    srm_tap_loss_projected(s, P, c, y, g, ...)  s           -> (pixel CE, image BCE) of `srm_loss`, the head's
                                                               logits l = Pᵀs + c made in the kernels (K > 256:
                                                               256 atoms at a time)
    srm_tap_loss_fused(l, y, g, ...)            l = Pᵀs + c -> the same from logits made by torch

Both read maps, tokens and vectors through their strides as `srm_hf.fused` describes, and sum per image and per
batch through partial buffers in a fixed order, finished by the last program of the launch. Pixel labels are atoms
in [0, K), as the teacher's targets give them: there is no ignore index (`F.cross_entropy`'s -100).
"""

import torch
from torch.autograd.function import once_differentiable

from . import fused
from .fused import (DOT_MIN, EPS, Launch, Pixels, launch_for, pixel_view, projected_plan, projection_dtype,
                    run_pixels, run_projected, triton)

LOSS_MAX_ATOMS = 256  # atoms in one block of the projected loss kernels; wider heads go a block at a time (sm_90: no
# spills, under 40 kB of shared memory)

if triton is not None:
    from .fused_loss_kernels import (loss_backward_kernel, loss_forward_kernel, projected_loss_backward_kernel,
                                     projected_loss_forward_kernel, wide_loss_backward_kernel,
                                     wide_loss_forward_kernel)


class _SRMTapLoss(torch.autograd.Function):
    """One tap's SRM terms from the head logits l, as one autograd node:

        pixel = w_pixel · mean over pixels of CE(x, y),  x = sigmoid(l) (paper) or l
        image = w_image · BCE(ḡ, g),  ḡ = mean over pixels of sigmoid(l), clamped to [1e-7, 1 - 1e-7] as `image_bce`

    One forward kernel: each program sums the CE and sigmoid(l) over its pixels; the last program of each image
    finishes that image's terms and the BCE's [N, K] derivative in ḡ, and the last image both terms (in place of a
    dozen [N, K] operators and a second kernel: what a small model's step waits for is the host launching them). The
    backward kernel recomputes everything else from l: l, the labels and that [N, K] derivative are all that is kept."""

    @staticmethod
    def forward(ctx, logits, pixel_labels, image_labels, pixel_weight, image_weight, ce_on_sigmoid):
        view = pixel_view(logits)
        launch = launch_for(view)
        labels = pixel_labels_for(pixel_labels, view, f"the head's logits {tuple(logits.shape)}")
        buffers, scales = loss_buffers(view, launch, view.atoms, pixel_weight, image_weight)
        run_pixels(loss_forward_kernel, view, launch, labels, image_labels_for(image_labels, view), *buffers,
                   launch.chunks, *scales, CE_ON_SIGMOID=ce_on_sigmoid)
        _, d_image, pixel, image, _ = buffers
        ctx.save_for_backward(view.x, labels, d_image)
        ctx.launch, ctx.scales = launch, (scales[0], image_weight / (d_image.numel() * view.pixels))
        ctx.meta = dict(CE_ON_SIGMOID=ce_on_sigmoid, PIXEL_TERM=bool(pixel_weight), IMAGE_TERM=bool(image_weight))
        return pixel, image  # two tensors of their own, not views: callers may change them in place

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pixel, grad_image):
        logits, labels, d_image = ctx.saved_tensors
        view = pixel_view(logits)
        out = torch.empty_like(logits)  # the layout of the logits (dense), its strides passed on
        run_pixels(loss_backward_kernel, view, ctx.launch, labels, grad_pixel, grad_image, d_image, out,
                   *pixel_view(out).strides, *ctx.scales, **ctx.meta)
        return out, None, None, None, None, None


class _ProjectedTapLoss(torch.autograd.Function):
    """`_SRMTapLoss` from the student's features s and the head's P [C, K] and scalar c: the logits l = Pᵀs + c are
    made inside both kernels and never stored (s, not l, is kept for backward). Backward recomputes l, writes dL/ds in
    the layout of s, and lays a copy of s and dL/dl out pixel-major so that one matmul gives dL/dP, in the dtype
    torch's projection would have had (autocast's, else the features'); dL/dc is summed by the kernel. Heads wider
    than a block of atoms (`loss_plan`) keep each pixel's log-sum-exp from forward for backward, and take dL/ds from
    dL/dl as written (rounded to that dtype, as autocast's convolution would get it)."""

    @staticmethod
    def forward(ctx, features, weight, bias, pixel_labels, image_labels, pixel_weight, image_weight, ce_on_sigmoid,
                plan):
        view, launch = plan
        atoms = weight.shape[1]
        labels = pixel_labels_for(pixel_labels, view, f"the head's logits from features {tuple(features.shape)}")
        buffers, scales = loss_buffers(view, launch, atoms, pixel_weight, image_weight)
        wide = launch.wide(atoms)
        lse = torch.empty(view.n * view.pixels, dtype=torch.float32, device=features.device) if wide else None
        run_projected(wide_loss_forward_kernel if wide else projected_loss_forward_kernel, view, launch, weight, bias,
                      labels, image_labels_for(image_labels, view._replace(atoms=atoms)), *buffers,
                      *([lse] if wide else []), launch.chunks, *scales, CE_ON_SIGMOID=ce_on_sigmoid)
        _, d_image, pixel, image, _ = buffers
        ctx.save_for_backward(view.x, weight, bias, labels, d_image, lse)
        ctx.plan, ctx.dtype = plan, projection_dtype(features)
        ctx.scales = scales[0], image_weight / (d_image.numel() * view.pixels)
        ctx.meta = dict(CE_ON_SIGMOID=ce_on_sigmoid, PIXEL_TERM=bool(pixel_weight), IMAGE_TERM=bool(image_weight))
        return pixel, image

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pixel, grad_image):
        features, weight, bias, labels, d_image, lse = ctx.saved_tensors
        view, launch = ctx.plan
        view = view._replace(x=features)
        pixels, (channels, atoms) = view.n * view.pixels, weight.shape
        grad_features = torch.empty_like(features)  # the layout of the features (dense), its strides passed on
        copy, grad_logits = (torch.empty(pixels, width, dtype=ctx.dtype, device=features.device)
                             for width in (channels, atoms))
        partial = torch.empty(view.n, launch.chunks, dtype=torch.float32, device=features.device)
        grad_bias = torch.empty_like(bias)
        run_projected(projected_loss_backward_kernel if lse is None else wide_loss_backward_kernel, view, launch,
                      weight, bias, labels, *([] if lse is None else [lse]), grad_pixel, grad_image, d_image,
                      grad_features, copy, grad_logits, partial, grad_bias, fused.counters(bias.device, 1),
                      *pixel_view(grad_features).strides, launch.chunks, *ctx.scales, **ctx.meta)
        grad_weight = (copy.t() @ grad_logits).to(weight.dtype)  # Σ over pixels of s dL/dlᵀ: [C, K]
        return (grad_features, grad_weight, grad_bias, *(None,) * 6)


def loss_plan(features: torch.Tensor, weight: torch.Tensor) -> tuple[Pixels, Launch] | None:
    """How the projected loss kernels walk `features` through the head P = weight [C, K]: `projected_plan` up to
    LOSS_MAX_ATOMS atoms; wider, one block of DOT_MIN pixels per program and the atoms LOSS_MAX_ATOMS at a time, 8
    warps. None without Triton or for an empty batch."""
    plan = projected_plan(features, weight, LOSS_MAX_ATOMS)
    if plan is not None or triton is None or features.numel() == 0:
        return plan
    view, _ = projected_plan(features, weight, max_atoms=triton.next_power_of_2(weight.shape[1]))
    return view, Launch(triton.cdiv(view.pixels, DOT_MIN), DOT_MIN, DOT_MIN, LOSS_MAX_ATOMS, 8)


def pixel_labels_for(pixel_labels: torch.Tensor, view: Pixels, what: str) -> torch.Tensor:
    """The pixel labels as the kernels read them (flat, one per pixel), or a ValueError before a kernel reads past
    them."""
    if pixel_labels.numel() != view.n * view.pixels:
        raise ValueError(f"pixel_labels {tuple(pixel_labels.shape)} do not give one label per pixel of {what}: pass "
                         "the teacher's labels for the tap these logits predict, on the same grid (`allow_resize` "
                         "resizes the head's map).")
    return pixel_labels if pixel_labels.is_contiguous() else pixel_labels.contiguous()


def loss_buffers(view: Pixels, launch: Launch, atoms: int, pixel_weight: float, image_weight: float):
    """A loss forward kernel's buffers, as it takes them: its work (per-program sums of the CE [N, chunks] and of p
    [N, chunks, K], then the N pixel and N image terms), dBCE/dḡ [N, K], the two terms (0-dim) and the counters of
    the programs that finish them; and its scales: the CE's (w_pixel × the mean over all pixels), p's (the mean
    over an image's pixels), ḡ's clamp and the BCE's (-w_image / (N·K))."""
    n, device = view.n, view.x.device
    work = torch.empty(n * launch.chunks * (atoms + 1) + 2 * n, dtype=torch.float32, device=device)
    d_image = torch.empty(n, atoms, dtype=torch.float32, device=device)
    pixel, image = (torch.empty((), dtype=torch.float32, device=device) for _ in range(2))
    buffers = (work, d_image, pixel, image, fused.counters(device, n + 1))
    return buffers, (pixel_weight / (n * view.pixels), 1.0 / view.pixels, EPS, -image_weight / (n * atoms))


def image_labels_for(image_labels: torch.Tensor, view: Pixels) -> torch.Tensor:
    """The image labels as a dense [N, K] tensor (broadcast as the eager BCE broadcasts them), for a kernel that reads
    them flat; labels of another size, or that ask for a gradient the kernels do not give, are refused."""
    if image_labels.requires_grad:
        raise ValueError("image_labels require grad, and the fused loss treats labels as constants (the teacher's "
                         "targets): detach them, or compute the terms with `srm_hf.srm.srm_loss`.")
    if image_labels.shape != (view.n, view.atoms):
        try:
            image_labels = image_labels.expand(view.n, view.atoms)
        except RuntimeError:
            raise ValueError(f"image_labels {tuple(image_labels.shape)} do not give one label per atom of each image "
                             f"({view.n} images × {view.atoms} atoms): pass the teacher's labels for the tap these "
                             "logits predict.") from None
    return image_labels.contiguous()


def srm_tap_loss_fused(head_logits: torch.Tensor, pixel_labels: torch.Tensor, image_labels: torch.Tensor,
                       pixel_weight: float, image_weight: float,
                       ce_on_sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_pixel · mean pixel CE, w_image · image BCE) of one tap, float32 scalars: `srm_hf.srm.srm_loss`'s terms."""
    return _SRMTapLoss.apply(head_logits, pixel_labels, image_labels, pixel_weight, image_weight, ce_on_sigmoid)


def srm_tap_loss_projected(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           pixel_labels: torch.Tensor, image_labels: torch.Tensor, pixel_weight: float,
                           image_weight: float, ce_on_sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`srm_tap_loss_fused(Pᵀs + c, ...)` of an `SRMHead` (P = weight [C, K], c = bias) with the projection inside the
    kernels: float32 sums (TF32 where torch's projection would use it), no logits in memory; None where it does not
    apply (no Triton, an empty batch)."""
    plan = loss_plan(features, weight)
    if plan is None:
        return None
    return _ProjectedTapLoss.apply(features, weight, bias, pixel_labels, image_labels, pixel_weight, image_weight,
                                   ce_on_sigmoid, plan)
