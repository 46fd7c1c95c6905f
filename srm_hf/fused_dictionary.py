"""Stage 1 (the dictionary step) through the Triton kernels of `srm_hf.fused`: the sparse codes and the MSE of the
reconstruction, each one autograd node, no float32 copy of the teacher's maps.

    sparse_codes_fused(a, k)   a = Dᵀt + b  -> λ = sigmoid(a) at the top k of each pixel, differentiable in a
    mse_fused(t̂, t)                        -> MSE(t̂, t) read in the maps' own dtype, differentiable in t̂
"""

import torch
from torch.autograd.function import once_differentiable

from .fused import ELEMENTS_PER_PROGRAM, _run, _run_elementwise, launch_for, pixel_view, triton

if triton is not None:
    from .fused_kernels import codes_grad_kernel, codes_kernel, squared_error_grad_kernel, squared_error_kernel


class _SparseCodes(torch.autograd.Function):
    """λ = sigmoid(a) at the top k of a, the mask without gradient. Backward needs λ alone: dλ/da = λ(1-λ) where an
    atom is kept (there λ = sigmoid(a)) and 0 elsewhere (there λ = 0)."""

    @staticmethod
    def forward(ctx, activation_logits, num_active):
        view = pixel_view(activation_logits)
        codes = torch.empty_like(view.x)  # the layout of `a` (dense), its strides passed on
        _run(codes_kernel, view, launch_for(view), codes, num_active, *pixel_view(codes).strides)
        ctx.save_for_backward(codes)
        return codes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_codes):
        codes, = ctx.saved_tensors
        if grad_codes.stride() != codes.stride():  # the kernel walks both as one dense run of memory
            grad_codes = torch.empty_like(codes).copy_(grad_codes)
        out = torch.empty_like(codes)
        _run_elementwise(codes_grad_kernel, codes.numel(), grad_codes, codes, out)
        return out, None


def sparse_codes_fused(activation_logits: torch.Tensor, num_active: int) -> torch.Tensor:
    """`SparseCoder.encode` after the projection a: λ = sigmoid(a) ⊙ 1[a among the k largest] (`top_k_mask`: exactly
    k, the lowest atom indices first among equal values), in the layout and dtype of `a`; differentiable in `a`."""
    return _SparseCodes.apply(activation_logits, num_active)


class _MeanSquaredError(torch.autograd.Function):
    """MSE(a, b) = mean (a - b)², differentiable in `a` (once: no double backward), both read in their own dtype
    (bf16 under autocast) and never cast to float32 in memory: one pass forward, one backward writing the gradient
    in a's dtype."""

    @staticmethod
    def forward(ctx, a, b):
        partial = torch.empty(triton.cdiv(a.numel(), ELEMENTS_PER_PROGRAM), dtype=torch.float32, device=a.device)
        _run_elementwise(squared_error_kernel, a.numel(), a, b, partial, 1.0 / a.numel())
        ctx.save_for_backward(a, b)
        return partial.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        out = torch.empty_like(a)
        _run_elementwise(squared_error_grad_kernel, a.numel(), grad, a, b, out, 2.0 / a.numel())
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
