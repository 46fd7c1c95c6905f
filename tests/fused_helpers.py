"""Shared by the fused-kernel tests (test_fused*.py): layouts, eager references and coders whose projections are exact.
Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest)."""

from contextlib import contextmanager

import pytest
import torch

from srm_hf.fused import triton_available
from srm_hf.srm import SparseCoder, srm_loss, srm_loss_fused, srm_targets, top_k_mask

requires_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (non-CUDA torch build)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


LAYOUTS = {  # name -> (shape of a [N, K, ...] / [N, L, K] / [N, K] tensor, channel dim)
    "maps": ((3, 10, 5, 6), 1),
    "maps, channels last": ((3, 10, 5, 6), 1),
    "tokens": ((3, 7, 10), -1),
    "vectors": ((4, 10), -1),
    "maps of 289 pixels": ((2, 40, 17, 17), 1),  # several programs per image, several blocks per program
    "tokens, K a power of two": ((2, 5, 8), -1),  # no padded atoms
}


def layout(name: str, x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if name == "maps, channels last" else x


def eager_targets(a: torch.Tensor, k: int, dim: int):
    """`SparseCoder.targets` after the projection a: the k largest a kept, their sigmoid the codes."""
    return srm_targets(torch.sigmoid(a.float()) * top_k_mask(a.float(), k, dim))


def assert_fused_loss_equals_eager(logits: torch.Tensor, pixel: torch.Tensor, image: torch.Tensor) -> None:
    """The fused terms equal the eager ones, and so does the gradient of their sum, to 1e-5 relative."""
    want, got = srm_loss(logits, pixel, image), srm_loss_fused(logits, pixel, image)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    want_grad, = torch.autograd.grad(sum(want.values()), logits)
    got_grad, = torch.autograd.grad(sum(got.values()), logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


PROJECTED = {  # name -> teacher features of C = 20 channels (not a multiple of the 16 a dot block takes)
    "maps": (3, 20, 5, 6),
    "maps, channels last": (3, 20, 5, 6),
    "tokens": (3, 7, 20),
    "vectors": (4, 20),
    "maps of 289 pixels": (2, 20, 17, 17),
}


def integer_coder(channels: int, atoms: int, k: int, seed: int) -> SparseCoder:
    """A coder whose projection Dᵀt + b of integer features is exact in float32, TF32 and any order of summation:
    atoms of small integers / 8 (a of a few units: the sigmoid does not saturate), b = 0.5; atoms j and j + K/2
    equal, so every pixel's largest value is tied."""
    coder = SparseCoder(channels, atoms, k)
    half = torch.randint(-2, 3, (channels, atoms // 2), generator=torch.Generator().manual_seed(seed)) / 8
    with torch.no_grad():
        coder.dictionary.copy_(torch.cat([half, half], dim=1))
        coder.bias.fill_(0.5)
    return coder.to(DEVICE)


@contextmanager
def fp32_precision(convolution: str, matmul: str):
    """torch's float32 precision ("tf32" or "ieee") for cuDNN convolutions and for matmuls, set through the
    `fp32_precision` settings (as transformers' `--tf32` sets it) and restored after."""
    backends = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend, precision in zip(backends, (convolution, matmul)):
            backend.fp32_precision = precision
        yield
    finally:
        for backend, precision in zip(backends, saved):
            backend.fp32_precision = precision
