"""Micro-benchmark of the SRM targets and loss alone on a GPU: four ResNet-18 taps at batch 128 (K = 2C), layouts
NCHW vs channels-last, torch.topk vs a full sort, eager vs torch.compile. Needs CUDA:

    python recipes/benchmarks/srm_ops.py

Prints forward+backward milliseconds per step and the peak memory above the inputs. Results: results/cost.md.
"""
import torch, torch.nn.functional as F, time, sys
torch.manual_seed(0)
dev = "cuda"
N = 128
taps = [(64, 56, 2), (128, 28, 5), (256, 14, 10), (512, 7, 20)]  # C, H, k ; K = 2C

def nchw(xt, xs, D, b, P, c, k):
    z = torch.sigmoid(F.conv2d(xt.float(), D.t()[:, :, None, None]) + b)
    v, idx = z.topk(k, dim=1)
    pixel = idx[:, 0]
    n = z.shape[0]
    image = z.new_zeros(n, D.shape[1]).scatter_add_(1, idx.reshape(n, -1), v.reshape(n, -1)) / (z.shape[2] * z.shape[3])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = F.conv2d(xs, P.t()[:, :, None, None].to(xs.dtype)) + c
    logits = h.float(); p = torch.sigmoid(logits)
    ce = F.cross_entropy(p, pixel)
    ip = p.flatten(2).mean(2).clamp(1e-7, 1 - 1e-7)
    bce = -(image * ip.log() + (1 - image) * (1 - ip).log()).mean()
    return ce + bce

def last(xt, xs, D, b, P, c, k):
    xt_ = xt.movedim(1, -1)
    z = torch.sigmoid(xt_.float() @ D + b)  # [N,H,W,K]
    v, idx = z.topk(k, dim=-1)
    pixel = idx[..., 0]
    n = z.shape[0]
    image = z.new_zeros(n, D.shape[1]).scatter_add_(1, idx.reshape(n, -1), v.reshape(n, -1)) / (z.shape[1] * z.shape[2])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = xs.movedim(1, -1) @ P.to(xs.dtype) + c
    logits = h.float(); p = torch.sigmoid(logits)
    K = p.shape[-1]
    ce = F.cross_entropy(p.reshape(-1, K), pixel.reshape(-1))
    ip = p.mean((1, 2)).clamp(1e-7, 1 - 1e-7)
    bce = -(image * ip.log() + (1 - image) * (1 - ip).log()).mean()
    return ce + bce

def bench(fn, mf, steps=30):
    data = []
    for C, H, k in taps:
        K = 2 * C
        xt = torch.randn(N, C, H, H, device=dev, dtype=torch.bfloat16).contiguous(memory_format=mf)
        xs = torch.randn(N, C, H, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
        xs2 = xs.detach().contiguous(memory_format=mf).requires_grad_()
        D = torch.randn(C, K, device=dev); b = torch.zeros(()); b = b.to(dev)
        P = torch.randn(C, K, device=dev, requires_grad=True); c = torch.zeros((), device=dev, requires_grad=True)
        data.append((xt, xs2, D, b, P, c, k))
    def step():
        loss = sum(fn(*d) for d in data)
        loss.backward()
    for _ in range(5): step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    for _ in range(steps): step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1000, (torch.cuda.max_memory_allocated() - base) / 2**20

import functools
def last_sort(xt, xs, D, b, P, c, k):
    global TOPK
    TOPK = "sort"
    try:
        return last(xt, xs, D, b, P, c, k)
    finally:
        TOPK = "topk"
TOPK = "topk"
_topk = torch.Tensor.topk
def patched(self, k, dim=-1):
    if TOPK == "sort":
        v, i = self.sort(dim=dim, descending=True)
        return v.narrow(dim, 0, k), i.narrow(dim, 0, k)
    return _topk(self, k, dim=dim)
torch.Tensor.topk = patched
comp_last = torch.compile(last)
for name, fn in (("nchw", nchw), ("last", last), ("lastsort", last_sort), ("compiled_last", comp_last)):
    for mfname, mf in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        ms, mem = bench(fn, mf)
        print(f"{name:5s} {mfname:14s} {ms:7.2f} ms  peak {mem:7.1f} MiB")
# check equal
torch.manual_seed(1)
C,H,k = 64, 8, 3
xt = torch.randn(4, C, H, H, device=dev); xs = torch.randn(4, C, H, H, device=dev)
D = torch.randn(C, 2*C, device=dev); b = torch.zeros((), device=dev); P = torch.randn(C, 2*C, device=dev); c = torch.zeros((), device=dev)
print("equal:", torch.allclose(nchw(xt, xs, D, b, P, c, k), last(xt, xs, D, b, P, c, k), atol=1e-3))
