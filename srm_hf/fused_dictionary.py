"""Stage 1 (the dictionary step) through the Triton kernels of `srm_hf.fused`: the sparse codes and the MSE of the
reconstruction, each one autograd node, no float32 copy of the teacher's maps.

    sparse_codes_projected(t, D, b, k)  t          -> λ = sigmoid(a) at the top k of each pixel, a = Dᵀt + b made
                                                      in the kernel (K ≤ 512); differentiable in t, D and b
    sparse_codes_fused(a, k)            a = Dᵀt + b -> the same from a projection made by torch, differentiable in a
    mse_fused(t̂, t)                                -> MSE(t̂, t) read in the maps' own dtype, differentiable in t̂
    dictionary_loss_projected(t, D, b, k)          -> MSE(D λ, t) all at once: one kernel forward, one kernel and
                                                      one matmul backward, differentiable in D and b (K ≤ 256 in one
                                                      block of atoms; wider, a block at a time, k ≤ 64)
"""

import torch
from torch.autograd.function import once_differentiable

from .fused import (ELEMENTS_PER_PROGRAM, Launch, Pixels, counters, launch_for, pixel_view, projected_plan,
                    projection_dtype, run_elementwise, run_pixels, run_projected, top_slots, triton, wide_plan)
from .srm import apply_per_pixel

DICTIONARY_MAX_ATOMS = 256  # stage 1's kernels take the atoms in one block up to this K, wider a block at a time
# (`fused.wide_plan`: for k up to fused.WIDE_MAX_ACTIVE; more: the codes kernel and torch's convolutions)
STAGES = {"forward": 1, "backward": 2}  # software pipelining of the two kernels' loads: at 8 warps no register
# spills and under 40 kB of shared memory for sm_90 at any K they take (tests/compile_kernels.py)

if triton is not None:
    from .fused_dictionary_kernels import (codes_grad_kernel, codes_kernel, dictionary_backward_kernel,
                                           dictionary_forward_kernel, projected_codes_kernel,
                                           squared_error_grad_kernel, squared_error_kernel,
                                           wide_dictionary_backward_kernel, wide_dictionary_forward_kernel)


class _SparseCodes(torch.autograd.Function):
    """λ = sigmoid(a) at the top k of a, the mask without gradient. Backward needs λ alone: dλ/da = λ(1-λ) where an
    atom is kept (there λ = sigmoid(a)) and 0 elsewhere (there λ = 0)."""

    @staticmethod
    def forward(ctx, activation_logits, num_active):
        view = pixel_view(activation_logits)
        codes = torch.empty_like(view.x)  # the layout of `a` (dense), its strides passed on
        run_pixels(codes_kernel, view, launch_for(view), codes, num_active, *pixel_view(codes).strides)
        ctx.save_for_backward(codes)
        return codes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_codes):
        codes, = ctx.saved_tensors
        return codes_gradient(grad_codes, codes), None


def codes_gradient(grad_codes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """dL/da = dL/dλ · λ(1-λ) in one kernel, in the layout and dtype of the codes."""
    if grad_codes.stride() != codes.stride():  # the kernel walks both as one dense run of memory
        grad_codes = torch.empty_like(codes).copy_(grad_codes)
    out = torch.empty_like(codes)
    run_elementwise(codes_grad_kernel, codes.numel(), grad_codes, codes, out)
    return out


def sparse_codes_fused(activation_logits: torch.Tensor, num_active: int) -> torch.Tensor:
    """`SparseCoder.encode` after the projection a: λ = sigmoid(a) ⊙ 1[a among the k largest] (`top_k_mask`: exactly
    k, the lowest atom indices first among equal values), in the layout and dtype of `a`; differentiable in `a`."""
    return _SparseCodes.apply(activation_logits, num_active)


class _ProjectedCodes(torch.autograd.Function):
    """λ = sigmoid(a) at the top k of a = Dᵀt + b, the projection made in the kernel: the codes are the only K-channel
    map written (in the dtype torch's projection would give: autocast's, else t's). Backward from λ and t:
    dL/da = dL/dλ · λ(1-λ), then dL/dD = Σ_pixels t dL/daᵀ (a convolution's or matmul's weight gradient, in the
    codes' dtype as autocast's projection computes it), dL/db = Σ dL/da and dL/dt = D dL/da."""

    @staticmethod
    def forward(ctx, features, dictionary, bias, num_active, plan):
        view, launch = plan
        dtype = projection_dtype(features)
        atoms = dictionary.shape[1]
        if features.dim() == 4:  # maps keep their memory format (pixel_view made them dense in it)
            last = view.x.is_contiguous(memory_format=torch.channels_last) and not view.x.is_contiguous()
            codes = torch.empty(features.shape[0], atoms, *features.shape[2:], dtype=dtype, device=features.device,
                                memory_format=torch.channels_last if last else torch.contiguous_format)
        else:
            codes = torch.empty(*features.shape[:-1], atoms, dtype=dtype, device=features.device)
        run_projected(projected_codes_kernel, view, launch, dictionary, bias, codes, num_active,
                      *pixel_view(codes).strides)
        ctx.save_for_backward(features, dictionary, codes)
        ctx.bias_dtype = bias.dtype
        return codes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_codes):
        features, dictionary, codes = ctx.saved_tensors
        grad_a = codes_gradient(grad_codes, codes)
        grad_t = grad_d = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_t = apply_per_pixel(grad_a, dictionary).to(features.dtype)
        if ctx.needs_input_grad[1]:
            t = features.to(grad_a.dtype)
            if t.dim() == 4:  # a 1×1 convolution's weight gradient: [K, C, 1, 1]
                grad_d = torch.nn.grad.conv2d_weight(t, (grad_a.shape[1], t.shape[1], 1, 1), grad_a).flatten(1).t()
            else:
                grad_d = t.reshape(-1, t.shape[-1]).t() @ grad_a.reshape(-1, grad_a.shape[-1])
            grad_d = grad_d.to(dictionary.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_a.sum(dtype=torch.float32).reshape(1).to(ctx.bias_dtype)
        return grad_t, grad_d, grad_b, None, None


def sparse_codes_projected(features: torch.Tensor, dictionary: torch.Tensor, bias: torch.Tensor,
                           num_active: int) -> torch.Tensor | None:
    """`SparseCoder.encode(t)` with the projection a = Dᵀt + b inside the kernel (float32 sums, TF32 where torch's
    would use it), differentiable in t, D and b; None where that kernel does not apply (`projected_plan`)."""
    plan = projected_plan(features, dictionary)
    return None if plan is None else _ProjectedCodes.apply(features, dictionary, bias, num_active, plan)


class _MeanSquaredError(torch.autograd.Function):
    """MSE(a, b) = mean (a - b)², differentiable in `a` (once: no double backward), both read in their own dtype
    (bf16 under autocast) and never cast to float32 in memory: one pass forward, one backward writing the gradient
    in a's dtype."""

    @staticmethod
    def forward(ctx, a, b):
        partial = torch.empty(triton.cdiv(a.numel(), ELEMENTS_PER_PROGRAM), dtype=torch.float32, device=a.device)
        loss = torch.empty((), dtype=torch.float32, device=a.device)
        run_elementwise(squared_error_kernel, a.numel(), a, b, partial, loss, counters(a.device, 1), 1.0 / a.numel())
        ctx.save_for_backward(a, b)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        out = torch.empty_like(a)
        run_elementwise(squared_error_grad_kernel, a.numel(), grad, a, b, out, 2.0 / a.numel())
        return out, None


def mse_fused(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
    """`srm_hf.srm.dictionary_loss` in two kernels, or None where they do not apply: Triton is needed, the two tensors
    must share one dense layout (contiguous, or both channels_last) and hold elements, and only the reconstruction
    may need a gradient."""
    formats = (torch.contiguous_format, torch.channels_last) if features.dim() == 4 else (torch.contiguous_format,)
    same_dense_layout = reconstruction.shape == features.shape and reconstruction.stride() == features.stride() and \
        any(reconstruction.is_contiguous(memory_format=f) for f in formats)
    if triton is None or not same_dense_layout or features.requires_grad or features.numel() == 0:
        return None
    return _MeanSquaredError.apply(reconstruction, features)


class _DictionaryLoss(torch.autograd.Function):
    """Stage 1's MSE(D λ, t), λ the codes of a = Dᵀt + b, of one tap, as one autograd node over D and b. Forward: one
    kernel writes λ (pixel-major, the dtype torch's projection would have) and the MSE, which its last program sums
    from the others' parts; backward: one kernel recomputes t̂ = D λ and writes e = dL/dt̂, a copy of t and dL/da
    pixel-major beside λ, so that one matmul gives dL/dD for the decoder (Σ e λᵀ) and the encoder (Σ t dL/daᵀ)
    together, and sums dL/db itself. No K- or C-channel map is read in another layout, and no convolution runs."""

    @staticmethod
    def forward(ctx, features, dictionary, bias, num_active, plan):
        view, launch = plan
        (channels, atoms), pixels = dictionary.shape, view.n * view.pixels
        y = torch.empty(2, pixels, atoms, dtype=projection_dtype(features), device=features.device)  # λ, then dL/da
        partial = torch.empty(view.n, launch.chunks, dtype=torch.float32, device=features.device)
        loss = torch.empty((), dtype=torch.float32, device=features.device)
        wide = launch.wide(atoms)
        kernel, meta = (wide_dictionary_forward_kernel, {"KP": top_slots(num_active)}) if wide else \
            (dictionary_forward_kernel, {})
        run_projected(kernel, view, launch, dictionary, bias, y, partial, loss, counters(features.device, 1),
                      num_active, launch.chunks, 1.0 / (pixels * channels), stages=STAGES["forward"], **meta)
        ctx.save_for_backward(view.x, dictionary, y)
        ctx.plan, ctx.bias_dtype = plan, bias.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        features, dictionary, y = ctx.saved_tensors
        view, launch = ctx.plan
        channels, pixels = dictionary.shape[0], y.shape[1]
        x = torch.empty(2, pixels, channels, dtype=y.dtype, device=y.device)  # e, then t
        partial = torch.empty(view.n, launch.chunks, dtype=torch.float32, device=y.device)
        grad_bias = torch.empty(1, dtype=ctx.bias_dtype, device=y.device)
        wide = launch.wide(dictionary.shape[1])
        run_projected(wide_dictionary_backward_kernel if wide else dictionary_backward_kernel,
                      view._replace(x=features), launch, dictionary, y, grad, x, y, partial, grad_bias,
                      counters(y.device, 1), launch.chunks, 2.0 / (pixels * channels), stages=STAGES["backward"])
        grad_dictionary = x.view(2 * pixels, channels).t() @ y.view(2 * pixels, -1)  # [C, K]
        return None, grad_dictionary.to(dictionary.dtype), grad_bias, None, None


def dictionary_loss_projected(features: torch.Tensor, dictionary: torch.Tensor, bias: torch.Tensor,
                              num_active: int) -> torch.Tensor | None:
    """`dictionary_loss(t, coder(t)[1])` of a `SparseCoder` (D, b, k) in two kernels and a matmul, differentiable in
    D and b (float32 sums, TF32 where torch's projection would use it); None where it does not apply: k >
    fused.WIDE_MAX_ACTIVE over more than DICTIONARY_MAX_ATOMS atoms, or features that need a gradient themselves (the
    teacher's never do)."""
    plan = dictionary_plan(features, dictionary, num_active)
    if plan is None or features.requires_grad:
        return None
    return _DictionaryLoss.apply(features, dictionary, bias, num_active, plan)


def dictionary_plan(features: torch.Tensor, dictionary: torch.Tensor,
                    num_active: int) -> tuple[Pixels, Launch] | None:
    """How stage 1's two kernels walk `features`: `projected_plan` up to DICTIONARY_MAX_ATOMS atoms, 8 warps; wider,
    the wide kernels' `wide_plan`. Stage 1's sums run over the whole batch alike, so the batch is one image where
    its layout allows (`batch_as_pixels`: vectors, channels_last maps, dense tokens). None where neither plan applies
    (no Triton, an empty batch, k > WIDE_MAX_ACTIVE)."""
    plan = projected_plan(features, dictionary, DICTIONARY_MAX_ATOMS, merge_batch=True)
    if plan is None:
        return wide_plan(features, dictionary, num_active, merge_batch=True)
    return plan[0], plan[1]._replace(warps=8)
