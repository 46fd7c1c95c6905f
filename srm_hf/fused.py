"""Fused SRM kernels (Triton): the teacher's targets and the student's SRM loss without K-channel float32 maps.

The eager path (`srm_hf.srm`) builds, per tap, the sigmoid map, `torch.topk` over K channels, a mask, the sparse
codes, their argmax and mean, then the head's sigmoid, softmax and BCE maps, each a [N, K, H, W] tensor in float32.
Here each pixel's K values stay in registers:

    srm_targets_fused(a, k)        a = Dᵀt + b  -> (pixel labels, image labels), as `srm_targets(encode(t))`
    sparse_codes_fused(a, k)       a = Dᵀt + b  -> the sparse codes λ of `encode(t)`, differentiable (stage 1)
    srm_loss_fused(l, y, g, ...)   l = Pᵀs + c  -> the pixel CE and image BCE of `srm_loss`, forward and backward

All three read maps [N, K, H, W] (channels first or last), tokens [N, L, K] and vectors [N, K] through their
strides, as pixels of K values; the top k are chosen on a (the sigmoid is monotone), exactly as `top_k_mask`
does. Per-image sums go through per-program partial buffers summed in a fixed order: the results do not depend on
scheduling. `use_fused` picks the path: the kernels on CUDA tensors when Triton is installed
(`srm_kernels="auto"`), always (`"triton"`; CPU tensors need `TRITON_INTERPRET=1`, slow, for tests) or never
(`"eager"`). The kernels run in float32 whatever the input dtype.
"""

import os
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
    from triton.errors import TritonError
except ImportError:  # Triton ships with CUDA builds of torch on Linux; elsewhere the eager path runs
    triton = None

KERNEL_CHOICES = ("auto", "triton", "eager")
PIXELS_PER_PROGRAM = 256  # pixels of one image summed by one program before its partial sums are written


def triton_available() -> bool:
    return triton is not None


def use_fused(kernels: str, tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run for `tensor` under `srm_kernels=kernels`."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"srm_kernels={kernels!r} is not one of {KERNEL_CHOICES}.")
    if kernels == "eager":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if kernels == "auto":
        return triton is not None and tensor.is_cuda
    if triton is None:
        raise ValueError("srm_kernels='triton' needs the `triton` package (it comes with CUDA builds of torch): "
                         "install it, or set srm_kernels='auto'.")
    if not (tensor.is_cuda or interpreted):
        raise ValueError(f"srm_kernels='triton' got a {tensor.device.type} tensor: the kernels run on CUDA, or on "
                         "the CPU under TRITON_INTERPRET=1 (slow, for tests). Set srm_kernels='auto'.")
    return True


class Pixels(NamedTuple):
    """A tensor seen as `n` images of `pixels` pixels with `atoms` values each, and the strides to walk it."""

    x: torch.Tensor
    n: int
    pixels: int
    atoms: int
    strides: tuple[int, int, int]  # of an image, an atom, a pixel


def pixel_view(x: torch.Tensor) -> Pixels:
    """Maps [N, K, H, W] (H and W merged into one stride: contiguous or channels_last, else copied), tokens [N, L, K]
    and vectors [N, K] (one pixel per image)."""
    if x.dim() == 4:
        if x.shape[2] > 1 and x.stride(2) != x.shape[3] * x.stride(3):
            x = x.contiguous()
        pixel_stride = x.stride(3) if x.shape[3] > 1 else x.stride(2)
        return Pixels(x, x.shape[0], x.shape[2] * x.shape[3], x.shape[1], (x.stride(0), x.stride(1), pixel_stride))
    if x.dim() == 3:
        return Pixels(x, x.shape[0], x.shape[1], x.shape[2], (x.stride(0), x.stride(2), x.stride(1)))
    if x.dim() == 2:
        return Pixels(x, x.shape[0], 1, x.shape[1], (x.stride(0), x.stride(1), 0))
    raise ValueError(f"Expected maps [N, K, H, W], tokens [N, L, K] or vectors [N, K]; got {tuple(x.shape)}.")


def _run(kernel, view: Pixels, *args, **meta) -> None:
    """Launch a kernel over `view` (programs: images × chunks of PIXELS_PER_PROGRAM pixels); a GPU or Triton version
    it does not compile for stops the run with the way around."""
    block_k = triton.next_power_of_2(view.atoms)
    block_s = max(1, min(triton.next_power_of_2(view.pixels), PIXELS_PER_PROGRAM, 4096 // block_k))  # ~4k values
    try:
        kernel[(view.n, num_chunks(view))](view.x, *args, view.pixels, view.atoms, *view.strides, **meta,
                                       PER_PROGRAM=PIXELS_PER_PROGRAM, BLOCK_S=block_s, BLOCK_K=block_k,
                                       num_warps=num_warps(block_k))
    except TritonError as e:  # CompilationError, OutOfResources, PTXASError
        raise RuntimeError(f"The fused SRM kernel {kernel.fn.__name__} does not compile here ({type(e).__name__}: "
                           f"{e}). Set srm_kernels='eager' (--srm_kernels eager) to use the PyTorch path.") from e


def num_warps(block_k: int) -> int:
    """Warps per program: 8 for the widest dictionaries (K > 512 atoms), else 4."""
    return 8 if block_k >= 1024 else 4


def num_chunks(view: Pixels) -> int:
    """Programs per image."""
    return triton.cdiv(view.pixels, PIXELS_PER_PROGRAM)


if triton is not None:

    @triton.jit
    def _sparse_codes(a, ok, num_active, BLOCK_K: tl.constexpr):
        # a [BLOCK_S, BLOCK_K] float32 -> λ = sigmoid(a) where an atom is among the k largest a of its pixel, else 0:
        # exactly k, the lowest atom indices first among equal values (`top_k_mask`); NaN wherever a pixel has one
        cols = tl.arange(0, BLOCK_K)[None, :]
        free, kept = ok, ok & (cols < 0)  # atoms still to choose from; atoms kept
        for _ in range(num_active):
            top = tl.max(tl.where(free, a, -float("inf")), axis=1)[:, None]
            first = tl.min(tl.where(free & (a == top), cols, BLOCK_K), axis=1)[:, None]
            kept, free = kept | (cols == first), free & (cols != first)
        nan = tl.max(tl.where(ok & (a != a), 1, 0), axis=1)[:, None] > 0  # tl.max skips NaN: keep it visible
        return tl.where(nan, float("nan"), tl.where(kept, tl.sigmoid(a), 0.0))

    @triton.jit
    def _codes_kernel(a_ptr, out_ptr, num_active, o_n, o_k, o_s, S, K, s_n, s_k, s_s,
                      PER_PROGRAM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
        # λ per pixel, written in the layout and dtype of `out`
        n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
        cols = tl.arange(0, BLOCK_K)
        for start in range(chunk * PER_PROGRAM, tl.minimum((chunk + 1) * PER_PROGRAM, S), BLOCK_S):
            rows = start + tl.arange(0, BLOCK_S)
            ok = (rows < S)[:, None] & (cols < K)[None, :]
            a = tl.load(a_ptr + n * s_n + rows[:, None] * s_s + cols[None, :] * s_k, mask=ok, other=0.0)
            codes = _sparse_codes(a.to(tl.float32), ok, num_active, BLOCK_K)
            tl.store(out_ptr + n * o_n + rows[:, None] * o_s + cols[None, :] * o_k,
                     codes.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _targets_kernel(a_ptr, label_ptr, part_ptr, num_active, chunks, S, K, s_n, s_k, s_s,
                        PER_PROGRAM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
        # one program: PER_PROGRAM pixels of image n; per pixel the codes λ and their first argmax (the pixel label),
        # and the sum of λ over the program's pixels (its part of the image label)
        n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        total = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(chunk * PER_PROGRAM, tl.minimum((chunk + 1) * PER_PROGRAM, S), BLOCK_S):
            rows = start + tl.arange(0, BLOCK_S)
            row_ok = rows < S
            ok = row_ok[:, None] & col_ok[None, :]
            a = tl.load(a_ptr + n * s_n + rows[:, None] * s_s + cols[None, :] * s_k, mask=ok, other=0.0)
            codes = _sparse_codes(a.to(tl.float32), ok, num_active, BLOCK_K)
            best = tl.max(tl.where(ok, codes, -1.0), axis=1)
            label = tl.min(tl.where(ok & (codes == best[:, None]), cols[None, :], BLOCK_K), axis=1)
            label = tl.where(label < K, label, 0)  # a pixel of NaN codes: NaN image labels say so, not the label
            tl.store(label_ptr + n * S + rows, label.to(tl.int64), mask=row_ok)
            total += tl.sum(tl.where(ok, codes, 0.0), axis=0)
        tl.store(part_ptr + (n * chunks + chunk) * K + cols, total, mask=col_ok)

    @triton.jit
    def _head_block(l_ptr, y_ptr, n, start, S, K, s_n, s_k, s_s, CE_ON_SIGMOID: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        # BLOCK_S pixels from `start` of image n: (pixel indices, mask, p = sigmoid(l), the CE input x = p or l with
        # padded atoms at -inf (padded pixels stay finite), labels y)
        rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
        ok = (rows < S)[:, None] & (cols < K)[None, :]
        logit = tl.load(l_ptr + n * s_n + rows[:, None] * s_s + cols[None, :] * s_k, mask=ok, other=0.0)
        logit = logit.to(tl.float32)
        p = tl.sigmoid(logit)
        x = tl.where((cols < K)[None, :], p if CE_ON_SIGMOID else logit, -float("inf"))
        y = tl.load(y_ptr + n * S + rows, mask=rows < S, other=0)
        return rows, ok, p, x, y

    @triton.jit
    def _loss_forward_kernel(l_ptr, y_ptr, ce_ptr, p_ptr, chunks, S, K, s_n, s_k, s_s,
                             CE_ON_SIGMOID: tl.constexpr, PER_PROGRAM: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        # per pixel: p = sigmoid(l), CE(x, y) with x = p (paper) or l; sums over the program's pixels of the CE and of p
        n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        ce_total = tl.zeros([BLOCK_S], dtype=tl.float32)
        p_total = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(chunk * PER_PROGRAM, tl.minimum((chunk + 1) * PER_PROGRAM, S), BLOCK_S):
            rows, ok, p, x, y = _head_block(l_ptr, y_ptr, n, start, S, K, s_n, s_k, s_s, CE_ON_SIGMOID, BLOCK_S,
                                            BLOCK_K)
            row_ok = rows < S
            top = tl.max(x, axis=1)
            lse = top + tl.log(tl.sum(tl.exp(x - top[:, None]), axis=1))
            x_y = tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
            ce_total += tl.where(row_ok, lse - x_y, 0.0)
            p_total += tl.sum(tl.where(ok, p, 0.0), axis=0)
        tl.store(ce_ptr + n * chunks + chunk, tl.sum(ce_total, axis=0))
        tl.store(p_ptr + (n * chunks + chunk) * K + cols, p_total, mask=col_ok)

    @triton.jit
    def _loss_backward_kernel(l_ptr, y_ptr, g_ce_ptr, g_p_ptr, out_ptr, o_n, o_k, o_s, ce_scale, p_scale,
                              S, K, s_n, s_k, s_s, CE_ON_SIGMOID: tl.constexpr, PER_PROGRAM: tl.constexpr,
                              BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
        # dL/dl = g_ce·ce_scale·(softmax(x) - onehot(y))·dx/dl + g_p[n]·p_scale·p(1-p), recomputed from l
        n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        g_ce = tl.load(g_ce_ptr) * ce_scale  # a device scalar: no host sync
        g_p = tl.load(g_p_ptr + n * K + cols, mask=col_ok, other=0.0) * p_scale
        for start in range(chunk * PER_PROGRAM, tl.minimum((chunk + 1) * PER_PROGRAM, S), BLOCK_S):
            rows, ok, p, x, y = _head_block(l_ptr, y_ptr, n, start, S, K, s_n, s_k, s_s, CE_ON_SIGMOID, BLOCK_S,
                                            BLOCK_K)
            e = tl.exp(x - tl.max(x, axis=1)[:, None])
            softmax = e / tl.sum(e, axis=1)[:, None]
            d_x = (softmax - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)) * g_ce
            slope = p * (1.0 - p)
            grad = (d_x * slope if CE_ON_SIGMOID else d_x) + g_p[None, :] * slope
            tl.store(out_ptr + n * o_n + rows[:, None] * o_s + cols[None, :] * o_k,
                     grad.to(out_ptr.dtype.element_ty), mask=ok)


@torch.no_grad()
def srm_targets_fused(activation_logits: torch.Tensor, num_active: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`srm_targets(SparseCoder.encode(t))` from the coder's projection a = Dᵀt + b ([N, K, H, W], [N, L, K] or
    [N, K]): (pixel labels [N, H, W] / [N, L] / [N] long, image labels [N, K] float32)."""
    view = pixel_view(activation_logits)
    labels = torch.empty(view.n, view.pixels, dtype=torch.long, device=view.x.device)
    partial = torch.empty(view.n, num_chunks(view), view.atoms, dtype=torch.float32, device=view.x.device)
    _run(_targets_kernel, view, labels, partial, num_active, num_chunks(view))
    spatial = activation_logits.shape[2:] if activation_logits.dim() == 4 else activation_logits.shape[1:-1]
    return labels.view(view.n, *spatial), partial.sum(dim=1) / view.pixels


class _SparseCodes(torch.autograd.Function):
    """λ = sigmoid(a) at the top k of a, the mask without gradient. Backward needs λ alone: dλ/da = λ(1-λ) where an
    atom is kept (there λ = sigmoid(a)) and 0 elsewhere (there λ = 0)."""

    @staticmethod
    def forward(ctx, activation_logits, num_active):
        view = pixel_view(activation_logits)
        codes = torch.empty_like(view.x)  # the layout of `a` (dense), its strides passed on
        _run(_codes_kernel, view, codes, num_active, *pixel_view(codes).strides)
        ctx.save_for_backward(codes)
        return codes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_codes):
        codes, = ctx.saved_tensors
        return grad_codes * codes * (1 - codes), None


def sparse_codes_fused(activation_logits: torch.Tensor, num_active: int) -> torch.Tensor:
    """`SparseCoder.encode` after the projection a: λ = sigmoid(a) ⊙ 1[a among the k largest] (`top_k_mask`: exactly
    k, the lowest atom indices first among equal values), in the layout and dtype of `a`; differentiable in `a`."""
    return _SparseCodes.apply(activation_logits, num_active)


class _PixelCEAndImagePred(torch.autograd.Function):
    """(mean pixel CE, per-image mean of sigmoid(l) [N, K]) from head logits l, with a backward kernel that
    recomputes everything from l: only l and the labels are kept for backward."""

    @staticmethod
    def forward(ctx, logits, labels, ce_on_sigmoid):
        view = pixel_view(logits)
        labels = labels.reshape(view.n, view.pixels).contiguous()
        ce = torch.empty(view.n, num_chunks(view), dtype=torch.float32, device=logits.device)
        p_sum = torch.empty(view.n, num_chunks(view), view.atoms, dtype=torch.float32, device=logits.device)
        _run(_loss_forward_kernel, view, labels, ce, p_sum, num_chunks(view), CE_ON_SIGMOID=ce_on_sigmoid)
        ctx.save_for_backward(view.x, labels)
        ctx.ce_on_sigmoid = ce_on_sigmoid
        return ce.sum() / (view.n * view.pixels), p_sum.sum(dim=1) / view.pixels

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, grad_image):
        logits, labels = ctx.saved_tensors
        view = pixel_view(logits)
        grad_ce = torch.zeros((), device=logits.device) if grad_ce is None else grad_ce.float().reshape(())
        grad_image = (torch.zeros(view.n, view.atoms, device=logits.device) if grad_image is None
                      else grad_image.float().contiguous())
        out = torch.empty_like(logits)  # the layout of the logits (dense), its strides passed on
        _run(_loss_backward_kernel, view, labels, grad_ce, grad_image, out, *pixel_view(out).strides,
             1.0 / (view.n * view.pixels), 1.0 / view.pixels, CE_ON_SIGMOID=ctx.ce_on_sigmoid)
        return out, None, None


def pixel_ce_and_image_pred(head_logits: torch.Tensor, pixel_labels: torch.Tensor,
                            ce_on_sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over pixels of CE(x, y), x = sigmoid(l) or l; mean over pixels of sigmoid(l) [N, K]), both float32."""
    return _PixelCEAndImagePred.apply(head_logits, pixel_labels, ce_on_sigmoid)
