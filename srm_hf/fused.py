"""Fused SRM kernels (Triton): the teacher's targets, the student's SRM loss and stage 1 without K-channel float32
maps; this module launches them and computes the targets.

The eager path (`srm_hf.srm`) builds, per tap, the sigmoid map, `torch.topk` over K channels, a mask, the sparse
codes, their argmax and mean, then the head's sigmoid, softmax and BCE maps, each a [N, K, H, W] tensor in float32.
Here each pixel's K values stay in registers:

    srm_targets_projected(t, D, b, k)  t          -> (pixel labels, image labels), as `srm_targets(encode(t))`,
                                                     the projection a = Dᵀt + b inside the kernel (K > 512: 256
                                                     atoms at a time, the top k kept across them, k ≤ 64)
    srm_targets_fused(a, k)            a = Dᵀt + b -> the same from a projection made by torch (k > 64 over K > 512)
    (the student's loss: `srm_hf.fused_loss`; stage 1: `srm_hf.fused_dictionary`)

All of them read maps [N, K, H, W] (channels first or last), tokens [N, L, K] and vectors [N, K] through their
strides, as pixels of K values; the top k are chosen on a (the sigmoid is monotone), exactly as `top_k_mask`
does. A program walks a run of pixels of one image; runs are shortened for small maps and batches so that a launch
has enough programs to fill a large GPU (`Launch`). Per-image and per-batch sums go through per-program partial
buffers that the last program to finish sums in a fixed order, in the same launch (`counters`): the results do not
depend on scheduling, and no separate reduction follows. `use_fused` picks the path: the kernels on CUDA tensors
when Triton is installed (`srm_kernels="auto"`), always (`"triton"`; CPU tensors need `TRITON_INTERPRET=1`, slow,
for tests) or never (`"eager"`). The kernels (`srm_hf.fused_kernels`, `fused_loss_kernels`,
`fused_dictionary_kernels`) run in float32 whatever the input dtype.
"""

import os
from typing import NamedTuple

import torch

try:
    import triton
    from triton.errors import TritonError

    from .fused_kernels import projected_targets_kernel, targets_kernel, wide_targets_kernel
except ImportError:  # Triton ships with CUDA builds of torch on Linux; elsewhere the eager path runs
    triton = None

KERNEL_CHOICES = ("auto", "triton", "eager")
PIXELS_PER_PROGRAM = 256  # at most this many pixels of one image per program (a power of two: runs tile by blocks)
MIN_PROGRAMS = 1024  # runs of pixels are halved (down to one block) until a launch has at least this many programs
ELEMENTS_PER_PROGRAM = 4096  # elementwise kernels
DOT_MIN = 16  # the smallest side of a block that tl.dot multiplies
PROJECTED_MAX_ATOMS = 512  # the projecting kernels take up to this many atoms in one block (shared memory) ...
WIDE_ATOMS = 256  # ... their wide versions this many at a time, keeping each pixel's top k across the blocks ...
WIDE_MAX_ACTIVE = 64  # ... for k up to this (more: torch projects, then the targets or codes kernel)
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
    and vectors [N, K] (one pixel per image). A layout whose offsets within one image pass 2³¹ (the batch not
    outermost, e.g. [L, N, K] transposed) is copied, so that the kernels' offsets within an image stay 32-bit."""
    view = _pixels(x)
    if (view.pixels - 1) * view.strides[2] + (view.atoms - 1) * view.strides[1] >= 2**31:
        view = _pixels(x.contiguous())
    return view


def _pixels(x: torch.Tensor) -> Pixels:
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

    def wide(self, atoms: int) -> bool:
        """Whether a projecting kernel walks `atoms` a block of block_k at a time (its wide version, `wide_plan`)."""
        return self.block_k < atoms


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


def launch_kernel(kernel, grid: tuple, *args, **meta) -> None:
    """Every kernel launch goes through here: a GPU or Triton version the kernel does not compile for stops the run
    with the way around."""
    try:
        kernel[grid](*args, **meta)
    except TritonError as e:  # CompilationError, OutOfResources, PTXASError
        raise RuntimeError(f"The fused SRM kernel {kernel.fn.__name__} does not compile here ({type(e).__name__}: "
                           f"{e}). Set srm_kernels='eager' (--srm_kernels eager) to use the PyTorch path.") from e


def run_pixels(kernel, view: Pixels, launch: Launch, *args, **meta) -> None:
    """Launch a kernel over `view` as `launch` says."""
    launch_kernel(kernel, (view.n, launch.chunks), view.x, *args, view.pixels, view.atoms, *view.strides,
                  launch.per_program, **meta, BLOCK_S=launch.block_s, BLOCK_K=launch.block_k, num_warps=launch.warps)


def run_elementwise(kernel, numel: int, *args) -> None:
    """Launch an elementwise kernel over `numel` elements of dense tensors of one shape and strides, walked as flat
    memory, ELEMENTS_PER_PROGRAM per program."""
    launch_kernel(kernel, (triton.cdiv(numel, ELEMENTS_PER_PROGRAM),), *args, numel, BLOCK=ELEMENTS_PER_PROGRAM)


def num_warps(block_k: int) -> int:
    """Warps per program: 8 for the widest dictionaries (K > 512 atoms), else 4."""
    return 8 if block_k >= 1024 else 4


_COUNTERS: dict[tuple, torch.Tensor] = {}


def counters(device: torch.device, size: int) -> torch.Tensor:
    """At least `size` int32 zeros, for the kernels whose last program finishes a sum (`arrive` in fused_kernels).
    Every launch leaves them at 0 again, so launches in order on one stream share one buffer, kept per device and
    stream: no allocation or memset per launch. A stream being captured into a CUDA graph gets zeros of its own,
    allocated (and zeroed) inside the graph."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = _COUNTERS[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buffer


@torch.no_grad()
def srm_targets_fused(activation_logits: torch.Tensor, num_active: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`srm_targets(SparseCoder.encode(t))` from the coder's projection a = Dᵀt + b ([N, K, H, W], [N, L, K] or
    [N, K]): (pixel labels [N, H, W] / [N, L] / [N] long, image labels [N, K] float32)."""
    view = pixel_view(activation_logits)
    launch = launch_for(view)
    outputs = targets_buffers(activation_logits, view, launch, view.atoms)
    run_pixels(targets_kernel, view, launch, *outputs, num_active, launch.chunks, 1.0 / view.pixels)
    return outputs[:2]


def grid(x: torch.Tensor) -> tuple[int, ...]:
    """The pixel grid of maps [N, C, H, W] (H, W), tokens [N, L, C] (L,) or vectors [N, C] ()."""
    return tuple(x.shape[2:]) if x.dim() == 4 else tuple(x.shape[1:-1])


def targets_buffers(x: torch.Tensor, view: Pixels, launch: Launch, atoms: int) -> tuple[torch.Tensor, ...]:
    """A targets kernel's outputs and work: pixel labels [N, *grid] (written flat, pixel by pixel), image labels
    [N, K], per-program sums of the codes [N, chunks, K] and a counter per image."""
    device = view.x.device
    return (torch.empty(view.n, *grid(x), dtype=torch.long, device=device),
            torch.empty(view.n, atoms, dtype=torch.float32, device=device),
            torch.empty(view.n, launch.chunks, atoms, dtype=torch.float32, device=device), counters(device, view.n))


def batch_as_pixels(view: Pixels) -> Pixels:
    """`view` as one image of N·S pixels where its images follow each other at its pixel stride (vectors, whose one
    pixel per image would fill a sixteenth of a block; channels_last maps; dense tokens), for kernels whose sums do
    not distinguish images (stage 1); else `view` unchanged, as where the merged offsets would pass 2³¹ or a launch
    of one block of pixels per program CUDA's grid limit."""
    s_n, s_k, s_s = view.strides
    pixel_stride = s_n if view.pixels == 1 else s_s
    pixels = view.n * view.pixels
    if view.n == 1 or s_n != view.pixels * pixel_stride or pixels > DOT_MIN * 65535 or \
            (pixels - 1) * pixel_stride + (view.atoms - 1) * s_k >= 2**31:
        return view
    return view._replace(n=1, pixels=pixels, strides=(0, s_k, pixel_stride))


def projected_plan(features: torch.Tensor, dictionary: torch.Tensor, max_atoms: int = PROJECTED_MAX_ATOMS,
                   merge_batch: bool = False) -> tuple[Pixels, Launch] | None:
    """How a kernel that projects `features` by `dictionary` [C, K] itself walks them: (features' view, plan), or None
    where such a kernel does not apply (no Triton; K > max_atoms: project with torch first). The blocks are half the
    other kernels' size, 8 warps from 256 atoms, channels DOT_MIN at a time: for sm_90 no register spills and under
    40 kB of shared memory with two stages, at any K it takes (tests/compile_kernels.py). `merge_batch`: the batch as
    one image where it can be (`batch_as_pixels`)."""
    channels, atoms = dictionary.shape
    if triton is None or triton.next_power_of_2(atoms) > max_atoms or features.numel() == 0:
        return None  # (an empty batch: the eager maths gives its NaN)
    view = pixel_view(features)
    view = batch_as_pixels(view) if merge_batch else view
    if view.atoms != channels:
        raise ValueError(f"features {tuple(features.shape)} have {view.atoms} channels, the dictionary "
                         f"{tuple(dictionary.shape)} {channels}: pass the tap this coder was built for.")
    launch = launch_for(view._replace(atoms=atoms), min_block=DOT_MIN, block_values=2048)
    return view, launch._replace(warps=8 if launch.block_k >= 256 else 4)


def wide_plan(features: torch.Tensor, dictionary: torch.Tensor, num_active: int,
              merge_batch: bool = False) -> tuple[Pixels, Launch] | None:
    """How a wide projecting kernel walks `features`: one block of DOT_MIN pixels per program (so up to 16 × 65,535
    pixels per image, CUDA's grid limit), the atoms WIDE_ATOMS at a time, 8 warps; None where it does not apply (no
    Triton, an empty batch, k > WIDE_MAX_ACTIVE). `merge_batch` as for `projected_plan`."""
    if triton is None or features.numel() == 0 or top_slots(num_active) > WIDE_MAX_ACTIVE:
        return None
    view, _ = projected_plan(features, dictionary, triton.next_power_of_2(dictionary.shape[1]), merge_batch)
    return view, Launch(triton.cdiv(view.pixels, DOT_MIN), DOT_MIN, DOT_MIN, WIDE_ATOMS, 8)


def top_slots(num_active: int) -> int:
    """The slots a wide kernel keeps per pixel for its running top k: k rounded up to a power of two (≥ 2)."""
    return max(2, triton.next_power_of_2(num_active))


def projection_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype torch's projection of `features` would have: autocast's where it is on, else the features'."""
    device = features.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else features.dtype


def tf32_allowed(convolution: bool) -> bool:
    """Whether torch multiplies float32 in TF32 in a cuDNN convolution (maps) or a matmul (tokens, vectors): the
    `fp32_precision` settings (torch ≥ 2.9; `--tf32` sets them through transformers, and reading the legacy flags
    after that raises), else the legacy `allow_tf32` flags."""
    cudnn = torch.backends.cudnn
    chain = (getattr(cudnn, "conv", None), cudnn, torch.backends) if convolution else \
        (torch.backends.cuda.matmul, torch.backends)  # the setting, then those it inherits from where it is "none"
    precisions = [getattr(backend, "fp32_precision", None) for backend in chain]
    if precisions[0] is None:  # torch < 2.9
        return cudnn.allow_tf32 if convolution else torch.backends.cuda.matmul.allow_tf32
    return next((p for p in precisions if p not in (None, "none")), "ieee") == "tf32"


def run_projected(kernel, view: Pixels, launch: Launch, dictionary: torch.Tensor, *args, stages: int = 2,
                  **meta) -> None:
    """Launch a kernel that multiplies the pixels of `view` by D [C, K] itself: its arguments are (t, D, *args, K, D's
    strides, then `run_pixels`'s). Its dot multiplies in TF32 where torch's projection would: cuDNN convolutions
    (maps) by default, matmuls (tokens, vectors) only when allowed."""
    tf32 = tf32_allowed(convolution=view.x.dim() == 4)
    run_pixels(kernel, view, launch, dictionary, *args, dictionary.shape[1], *dictionary.stride(),
               **meta, PRECISION="tf32" if tf32 else "ieee", BLOCK_C=DOT_MIN, num_stages=stages)


@torch.no_grad()
def srm_targets_projected(features: torch.Tensor, dictionary: torch.Tensor, bias: torch.Tensor,
                          num_active: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`srm_targets_fused(a, k)` with the projection a = Dᵀt + b inside the kernel: the teacher's features t
    ([N, C, H, W], [N, L, C] or [N, C]) read once in their own dtype, D [C, K] and the scalar b in float32, sums in
    float32 (TF32 where torch's convolution or matmul would use it), and no K-channel map in memory. Over 512 atoms
    the wide kernel takes them 256 at a time. None where neither applies (`projected_plan`, `wide_plan`)."""
    plan = projected_plan(features, dictionary) or wide_plan(features, dictionary, num_active)
    if plan is None:
        return None
    view, launch = plan
    kernel, meta = (wide_targets_kernel, {"KP": top_slots(num_active)}) if launch.wide(dictionary.shape[1]) else \
        (projected_targets_kernel, {})
    outputs = targets_buffers(features, view, launch, dictionary.shape[1])
    run_projected(kernel, view, launch, dictionary, bias, *outputs, num_active, launch.chunks, 1.0 / view.pixels,
                  **meta)
    return outputs[:2]
