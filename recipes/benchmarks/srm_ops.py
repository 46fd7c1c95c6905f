"""Micro-benchmark of the SRM targets and loss alone on a GPU: the four ResNet-18 taps at batch 128 (K = 2C),
channels first (as srm_hf computes them) against channels last, `torch.topk` against a full sort, eager against
`torch.compile`, and srm_hf's fused Triton kernels (targets in bf16 here). Needs CUDA:

    python recipes/benchmarks/srm_ops.py
    python recipes/benchmarks/srm_ops.py --sweep   # the fused kernels' launch settings instead

Prints the forward + backward milliseconds per step and the peak memory above the inputs, for inputs in the
default and in `channels_last` memory format. Results and reading: results/cost.md.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from srm_hf import fused as fused_module
from srm_hf.fused import srm_targets_fused
from srm_hf.srm import project, srm_loss_fused

BATCH = 128
TAPS = [(64, 56, 2), (128, 28, 5), (256, 14, 10), (512, 7, 20)]  # (C, H = W, k); K = 2C


def topk(z: torch.Tensor, k: int, dim: int):
    return z.topk(k, dim=dim)


def sort_topk(z: torch.Tensor, k: int, dim: int):
    values, indices = z.sort(dim=dim, descending=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def bce(image_pred: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    image_pred = image_pred.clamp(1e-7, 1 - 1e-7)
    return -(image * image_pred.log() + (1 - image) * (1 - image_pred).log()).mean()


def channels_first(xt, xs, D, b, P, c, k, select=topk):
    """Teacher targets and student SRM loss on [N, K, H, W] maps (1x1 convolutions)."""
    z = torch.sigmoid(F.conv2d(xt.float(), D.t()[:, :, None, None]) + b)
    values, idx = select(z, k, 1)
    n, pixels = z.shape[0], z.shape[2] * z.shape[3]
    image = z.new_zeros(n, D.shape[1]).scatter_add_(1, idx.reshape(n, -1), values.reshape(n, -1)) / pixels
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = F.conv2d(xs, P.t()[:, :, None, None].to(xs.dtype)) + c
    p = torch.sigmoid(h.float())
    return F.cross_entropy(p, idx[:, 0]) + bce(p.flatten(2).mean(2), image)


def channels_last(xt, xs, D, b, P, c, k, select=topk):
    """The same on [N, H, W, K] (matmuls; top-k and softmax along the contiguous dimension)."""
    z = torch.sigmoid(xt.movedim(1, -1).float() @ D + b)
    values, idx = select(z, k, -1)
    n, pixels = z.shape[0], z.shape[1] * z.shape[2]
    image = z.new_zeros(n, D.shape[1]).scatter_add_(1, idx.reshape(n, -1), values.reshape(n, -1)) / pixels
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = xs.movedim(1, -1) @ P.to(xs.dtype) + c
    p = torch.sigmoid(h.float())
    num_atoms = p.shape[-1]
    return F.cross_entropy(p.reshape(-1, num_atoms), idx[..., 0].reshape(-1)) + bce(p.mean((1, 2)), image)


def fused(xt, xs, D, b, P, c, k):
    """The same through srm_hf's Triton kernels (`srm_hf.fused`): projections by cuDNN (`srm_hf.srm.project`, bias
    inside), the rest in the kernels."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, h = project(xt, D, b), project(xs, P, c)
    pixel, image = srm_targets_fused(a, k)
    return sum(srm_loss_fused(h, pixel, image).values())


def channels_last_sort(*args):
    return channels_last(*args, select=sort_topk)


def bench(fn, memory_format, steps: int = 30, warmup: int = 5) -> tuple[float, float]:
    data = []
    for channels, size, k in TAPS:
        atoms = 2 * channels
        xt = torch.randn(BATCH, channels, size, size, device="cuda", dtype=torch.bfloat16)
        xs = torch.randn(BATCH, channels, size, size, device="cuda", dtype=torch.bfloat16)
        D, b = torch.randn(channels, atoms, device="cuda"), torch.zeros((), device="cuda")
        P = torch.randn(channels, atoms, device="cuda", requires_grad=True)
        c = torch.zeros((), device="cuda", requires_grad=True)
        data.append((xt.contiguous(memory_format=memory_format),
                     xs.contiguous(memory_format=memory_format).requires_grad_(), D, b, P, c, k))

    def step():
        sum(fn(*d) for d in data).backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000, (torch.cuda.max_memory_allocated() - base) / 2**20


def sweep():
    """The fused variant under other launch settings: the most pixels per program and the fewest programs per launch
    (`srm_hf.fused.launch_for`), and warps per program (default: by K)."""
    defaults = fused_module.PIXELS_PER_PROGRAM, fused_module.MIN_PROGRAMS, fused_module.num_warps
    settings = ([(pixels, defaults[1], None) for pixels in (64, 128, 256, 512, 1024)]
                + [(defaults[0], programs, None) for programs in (1, 256, 4096)]
                + [(defaults[0], defaults[1], w) for w in (2, 4, 8, 16)])
    try:
        for pixels, programs, warps in settings:
            fused_module.PIXELS_PER_PROGRAM, fused_module.MIN_PROGRAMS = pixels, programs
            fused_module.num_warps = defaults[2] if warps is None else (lambda block_k, w=warps: w)
            for layout, memory_format in (("default", torch.contiguous_format), ("channels_last", torch.channels_last)):
                ms, mib = bench(fused, memory_format)
                print(f"fused: at most {pixels:5d} pixels per program, at least {programs:5d} programs, warps "
                      f"{warps or 'by K':5}, inputs {layout:14s} {ms:7.2f} ms  peak {mib:7.1f} MiB", flush=True)
    finally:
        fused_module.PIXELS_PER_PROGRAM, fused_module.MIN_PROGRAMS, fused_module.num_warps = defaults


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="Time the fused kernels' launch settings instead.")
    if parser.parse_args().sweep:
        return sweep()
    torch.manual_seed(0)
    variants = {"channels first (srm_hf)": channels_first, "channels last": channels_last,
                "channels last, sort": channels_last_sort, "channels last, compiled": torch.compile(channels_last),
                "fused kernels (srm_hf)": fused}
    for name, fn in variants.items():
        for layout, memory_format in (("default", torch.contiguous_format), ("channels_last", torch.channels_last)):
            ms, mib = bench(fn, memory_format)
            print(f"{name:26s} inputs {layout:14s} {ms:7.2f} ms  peak {mib:7.1f} MiB")
    torch.manual_seed(1)
    C, H, k = 64, 8, 3
    xt, xs = torch.randn(4, C, H, H, device="cuda"), torch.randn(4, C, H, H, device="cuda")
    D, P, zero = torch.randn(C, 2 * C, device="cuda"), torch.randn(C, 2 * C, device="cuda"), torch.zeros((), device="cuda")
    same = torch.allclose(channels_first(xt, xs, D, zero, P, zero, k), channels_last(xt, xs, D, zero, P, zero, k),
                          atol=1e-3)
    print("channels first and last give the same loss:", same)


if __name__ == "__main__":
    main()
