"""Fused SRM kernels (Triton): the teacher's targets and the student's SRM loss without K-channel float32 maps.

The eager path (`srm_hf.srm`) builds, per tap, the sigmoid map, `torch.topk` over K channels, a mask, the sparse
codes, their argmax and mean, then the head's sigmoid, softmax and BCE maps, each a [N, K, H, W] tensor in float32.
Here each pixel's K values stay in registers:

    srm_targets_projected(t, D, b, k)  t          -> (pixel labels, image labels), as `srm_targets(encode(t))`,
                                                     the projection a = Dᵀt + b inside the kernel (K ≤ 512)
    srm_targets_fused(a, k)            a = Dᵀt + b -> the same from a projection made by torch (wider dictionaries)
    srm_loss_fused(l, y, g, ...)       l = Pᵀs + c -> the pixel CE and image BCE of `srm_loss`, forward and backward,
                                                     one autograd node per tap
    (stage 1's codes and MSE: `srm_hf.fused_dictionary`)

All of them read maps [N, K, H, W] (channels first or last), tokens [N, L, K] and vectors [N, K] through their
strides, as pixels of K values; the top k are chosen on a (the sigmoid is monotone), exactly as `top_k_mask`
does. A program walks a run of pixels of one image; runs are shortened for small maps and batches so that a launch
has enough programs to fill a large GPU (`Launch`). Per-image sums go through per-program partial buffers summed in
a fixed order: the results do not depend on scheduling. `use_fused` picks the path: the kernels on CUDA tensors
when Triton is installed (`srm_kernels="auto"`), always (`"triton"`; CPU tensors need `TRITON_INTERPRET=1`, slow,
for tests) or never (`"eager"`). The kernels (`srm_hf.fused_kernels`) run in float32 whatever the input dtype.
"""

import os
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    from triton.errors import TritonError

    from .fused_kernels import (image_term_kernel, loss_backward_kernel, loss_forward_kernel,
                                projected_targets_kernel, targets_kernel)
except ImportError:  # Triton ships with CUDA builds of torch on Linux; elsewhere the eager path runs
    triton = None

KERNEL_CHOICES = ("auto", "triton", "eager")
PIXELS_PER_PROGRAM = 256  # at most this many pixels of one image per program (a power of two: runs tile by blocks)
MIN_PROGRAMS = 1024  # runs of pixels are halved (down to one block) until a launch has at least this many programs
ELEMENTS_PER_PROGRAM = 4096  # elementwise kernels
DOT_MIN = 16  # the smallest side of a block that tl.dot multiplies
PROJECTED_MAX_ATOMS = 512  # wider dictionaries are projected by torch before the targets kernel (shared memory)
EPS = 1e-7  # ḡ is clamped to [EPS, 1 - EPS] before the BCE's logarithms, as in `srm_hf.srm.image_bce`


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


class Launch(NamedTuple):
    """How a kernel walks a `Pixels` view: programs (images × chunks), each over `per_program` pixels of one image
    in blocks of `block_s` pixels × `block_k` atoms (K padded to a power of two)."""

    chunks: int  # programs per image
    per_program: int
    block_s: int
    block_k: int
    warps: int


def launch_for(view: Pixels, min_block: int = 1, block_values: int = 4096) -> Launch:
    """A block holds about `block_values` values; a program walks up to PIXELS_PER_PROGRAM pixels, fewer when the
    launch would otherwise have under MIN_PROGRAMS programs (late stages, small batches: one program per image left
    most of a GPU idle). A function of the shape alone, so the summation order is too. `min_block`: the smallest
    block side (DOT_MIN for a kernel that multiplies blocks)."""
    block_k = max(min_block, triton.next_power_of_2(view.atoms))
    block_s = max(min_block, min(triton.next_power_of_2(view.pixels), PIXELS_PER_PROGRAM, block_values // block_k))
    per_program = PIXELS_PER_PROGRAM  # a power of two, so a multiple of block_s
    while per_program > block_s and view.n * triton.cdiv(view.pixels, per_program) < MIN_PROGRAMS:
        per_program //= 2
    return Launch(triton.cdiv(view.pixels, per_program), per_program, block_s, block_k, num_warps(block_k))


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    """Every kernel launch goes through here: a GPU or Triton version the kernel does not compile for stops the run
    with the way around."""
    try:
        kernel[grid](*args, **meta)
    except TritonError as e:  # CompilationError, OutOfResources, PTXASError
        raise RuntimeError(f"The fused SRM kernel {kernel.fn.__name__} does not compile here ({type(e).__name__}: "
                           f"{e}). Set srm_kernels='eager' (--srm_kernels eager) to use the PyTorch path.") from e


def _run(kernel, view: Pixels, launch: Launch, *args, **meta) -> None:
    """Launch a kernel over `view` as `launch` says."""
    _launch(kernel, (view.n, launch.chunks), view.x, *args, view.pixels, view.atoms, *view.strides, launch.per_program,
            **meta, BLOCK_S=launch.block_s, BLOCK_K=launch.block_k, num_warps=launch.warps)


def _run_elementwise(kernel, numel: int, *args) -> None:
    """Launch an elementwise kernel over `numel` elements of dense tensors of one shape and strides, walked as flat
    memory, ELEMENTS_PER_PROGRAM per program."""
    _launch(kernel, (triton.cdiv(numel, ELEMENTS_PER_PROGRAM),), *args, numel, BLOCK=ELEMENTS_PER_PROGRAM)


def num_warps(block_k: int) -> int:
    """Warps per program: 8 for the widest dictionaries (K > 512 atoms), else 4."""
    return 8 if block_k >= 1024 else 4


@torch.no_grad()
def srm_targets_fused(activation_logits: torch.Tensor, num_active: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`srm_targets(SparseCoder.encode(t))` from the coder's projection a = Dᵀt + b ([N, K, H, W], [N, L, K] or
    [N, K]): (pixel labels [N, H, W] / [N, L] / [N] long, image labels [N, K] float32)."""
    view = pixel_view(activation_logits)
    launch = launch_for(view)
    spatial = activation_logits.shape[2:] if activation_logits.dim() == 4 else activation_logits.shape[1:-1]
    labels = torch.empty(view.n, *spatial, dtype=torch.long, device=view.x.device)  # written flat, pixel by pixel
    partial = torch.empty(view.n, launch.chunks, view.atoms, dtype=torch.float32, device=view.x.device)
    _run(targets_kernel, view, launch, labels, partial, num_active, launch.chunks, 1.0 / view.pixels)
    return labels, partial.sum(dim=1)


def projected_plan(features: torch.Tensor, dictionary: torch.Tensor,
                   max_atoms: int = PROJECTED_MAX_ATOMS) -> tuple[Pixels, Launch] | None:
    """How a kernel that projects `features` by `dictionary` [C, K] itself walks them: (features' view, plan), or None
    where such a kernel does not apply (no Triton; K > max_atoms: project with torch first). The blocks are half the
    other kernels' size, 8 warps from 256 atoms, channels DOT_MIN at a time: for sm_90 no register spills and under
    40 kB of shared memory with two stages, at any K it takes (tests/compile_kernels.py)."""
    channels, atoms = dictionary.shape
    if triton is None or triton.next_power_of_2(atoms) > max_atoms:
        return None
    view = pixel_view(features)
    if view.atoms != channels:
        raise ValueError(f"features {tuple(features.shape)} have {view.atoms} channels, the dictionary "
                         f"{tuple(dictionary.shape)} {channels}: pass the tap this coder was built for.")
    launch = launch_for(view._replace(atoms=atoms), min_block=DOT_MIN, block_values=2048)
    return view, launch._replace(warps=8 if launch.block_k >= 256 else 4)


def _run_projected(kernel, view: Pixels, launch: Launch, dictionary: torch.Tensor, *args, stages: int = 2) -> None:
    """Launch a kernel that multiplies the pixels of `view` by D [C, K] itself: its arguments are (t, D, *args, K, D's
    strides, then `_run`'s). Its dot multiplies in TF32 where torch's projection would: cuDNN convolutions (maps) by
    default, matmuls (tokens, vectors) only when allowed."""
    tf32 = torch.backends.cudnn.allow_tf32 if view.x.dim() == 4 else torch.backends.cuda.matmul.allow_tf32
    _run(kernel, view, launch, dictionary, *args, dictionary.shape[1], *dictionary.stride(),
         PRECISION="tf32" if tf32 else "ieee", BLOCK_C=DOT_MIN, num_stages=stages)


@torch.no_grad()
def srm_targets_projected(features: torch.Tensor, dictionary: torch.Tensor, bias: torch.Tensor,
                          num_active: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`srm_targets_fused(a, k)` with the projection a = Dᵀt + b inside the kernel: the teacher's features t
    ([N, C, H, W], [N, L, C] or [N, C]) read once in their own dtype, D [C, K] and the scalar b in float32, sums in
    float32 (TF32 where torch's convolution or matmul would use it), and no K-channel map in memory. None where it
    does not apply (`projected_plan`)."""
    plan = projected_plan(features, dictionary)
    if plan is None:
        return None
    view, launch = plan
    spatial = features.shape[2:] if features.dim() == 4 else features.shape[1:-1]
    labels = torch.empty(view.n, *spatial, dtype=torch.long, device=view.x.device)  # written flat, pixel by pixel
    partial = torch.empty(view.n, launch.chunks, dictionary.shape[1], dtype=torch.float32, device=view.x.device)
    _run_projected(projected_targets_kernel, view, launch, dictionary, bias, labels, partial, num_active,
                   launch.chunks, 1.0 / view.pixels)
    return labels, partial.sum(dim=1)


class _SRMTapLoss(torch.autograd.Function):
    """One tap's SRM terms from the head logits l, as one autograd node:

        pixel = w_pixel · mean over pixels of CE(x, y),  x = sigmoid(l) (paper) or l
        image = w_image · BCE(ḡ, g),  ḡ = mean over pixels of sigmoid(l), clamped to [1e-7, 1 - 1e-7] as `image_bce`

    The forward kernel leaves only per-program sums of the CE and of sigmoid(l); a second kernel, one program per
    image, sums them into both terms and writes the BCE's [N, K] derivative in ḡ (in place of a dozen [N, K]
    operators: what a small model's step waits for is the host launching them). The backward kernel recomputes
    everything else from l: l, the labels and that [N, K] derivative are all that is kept."""

    @staticmethod
    def forward(ctx, logits, pixel_labels, image_labels, pixel_weight, image_weight, ce_on_sigmoid):
        view = pixel_view(logits)
        launch = launch_for(view)
        if pixel_labels.numel() != view.n * view.pixels:  # the kernels read them flat, one per pixel
            raise ValueError(f"pixel_labels {tuple(pixel_labels.shape)} do not give one label per pixel of the head's "
                             f"logits {tuple(logits.shape)}: pass the teacher's labels for the tap these logits "
                             "predict, on the same grid (`allow_resize` resizes the head's map).")
        labels = pixel_labels if pixel_labels.is_contiguous() else pixel_labels.contiguous()
        ce = torch.empty(view.n, launch.chunks, dtype=torch.float32, device=logits.device)
        p_sum = torch.empty(view.n, launch.chunks, view.atoms, dtype=torch.float32, device=logits.device)
        ce_scale = pixel_weight / (view.n * view.pixels)  # the pixel term: w_pixel × the mean over all pixels
        _run(loss_forward_kernel, view, launch, labels, ce, p_sum, launch.chunks, ce_scale, 1.0 / view.pixels,
             CE_ON_SIGMOID=ce_on_sigmoid)
        # per image: the CE partials summed, ḡ [N, K] from the p partials, its BCE and dBCE/dḡ (/ (N·K) in backward)
        d_image = torch.empty(view.n, view.atoms, dtype=torch.float32, device=logits.device)
        pixel, image = (torch.empty(view.n, dtype=torch.float32, device=logits.device) for _ in range(2))
        _launch(image_term_kernel, (view.n,), ce, p_sum, image_labels_for(image_labels, view), d_image, pixel, image,
                launch.chunks, view.atoms, EPS, -image_weight / d_image.numel(),
                BLOCK_C=min(triton.next_power_of_2(launch.chunks), 128), BLOCK_K=min(launch.block_k, 1024))
        ctx.save_for_backward(view.x, labels, d_image)
        ctx.launch, ctx.scales = launch, (ce_scale, image_weight / (d_image.numel() * view.pixels))
        ctx.meta = dict(CE_ON_SIGMOID=ce_on_sigmoid, PIXEL_TERM=bool(pixel_weight), IMAGE_TERM=bool(image_weight))
        return pixel.sum(), image.sum()  # two tensors of their own, not views: callers may change them in place

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pixel, grad_image):
        logits, labels, d_image = ctx.saved_tensors
        view = pixel_view(logits)
        out = torch.empty_like(logits)  # the layout of the logits (dense), its strides passed on
        _run(loss_backward_kernel, view, ctx.launch, labels, grad_pixel, grad_image, d_image, out,
             *pixel_view(out).strides, *ctx.scales, **ctx.meta)
        return out, None, None, None, None, None


def image_labels_for(image_labels: torch.Tensor, view: Pixels) -> torch.Tensor:
    """The image labels as a dense [N, K] tensor (broadcast as the eager BCE broadcasts them), for a kernel that reads
    them flat; labels of another size are refused before a kernel reads past them."""
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
