"""The building blocks of Sparse Representation Matching (Tran, Gabbouj, Iosifidis, arXiv 2103.17012).

`SparseCoder` learns a dictionary over one teacher tap, `srm_targets` turns its sparse codes into labels and
`SRMHead` is the student's predictor of those labels. Feature maps come in three layouts and all are treated
as a set of "pixels" with C channels each:

    maps    [N, C, H, W]  (CNN stages)
    vectors [N, C]        (pooled features; one pixel per image)
    tokens  [N, L, C]     (transformer blocks; each token is a pixel)

Codes and head outputs keep the layout of their input: [N, K, H, W], [N, K] or [N, L, K].
"""

import torch
import torch.nn as nn


def num_atoms_for(channels: int, codeword_multiplier: float) -> int:
    """K = int(m * C): dictionary size for a tap with C channels."""
    return max(1, int(codeword_multiplier * channels))


def num_active_for(channels: int, codeword_multiplier: float, sparsity_multiplier: float) -> int:
    """k = max(1, int(m * s * C)): atoms kept per pixel."""
    return max(1, int(codeword_multiplier * sparsity_multiplier * channels))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C]; [N, C] -> [N, 1, C]; [N, L, C] unchanged."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    raise ValueError(
        f"Expected a feature map [N, C, H, W], tokens [N, L, C] or vectors [N, C]; got shape {tuple(x.shape)}. "
        "Tap a module whose output has one of these layouts."
    )


def from_pixels(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_pixels`: [N, P, K] back to the layout of `like` with K channels."""
    if like.dim() == 4:
        n, _, h, w = like.shape
        return p.transpose(1, 2).reshape(n, p.shape[-1], h, w)
    if like.dim() == 2:
        return p.squeeze(1)
    return p


def _init_projection(weight: torch.Tensor, bias: torch.Tensor) -> None:
    # Kaiming-uniform on the (C, K) tensor (fan-in = K, as torch counts it), scalar bias ~ U(-1, 1).
    nn.init.kaiming_uniform_(weight)
    nn.init.uniform_(bias, -1.0, 1.0)


class SparseCoder(nn.Module):
    """Dictionary `D [C, K]` with one scalar bias `b`, learnt over one teacher tap.

    encode: z = sigmoid(Dᵀ t + b) per pixel, then hard top-k: λ = z ⊙ 1[z ≥ z_(k)] with exactly k kept
            (ties broken by `torch.topk`; the mask carries no gradient).
    decode: t̂ = D λ (tied weights).
    """

    def __init__(self, in_channels: int, num_atoms: int, num_active: int):
        super().__init__()
        if not 1 <= num_active <= num_atoms:
            raise ValueError(
                f"num_active={num_active} must be between 1 and num_atoms={num_atoms}; lower the sparsity "
                "multiplier `s` or raise the codeword multiplier `m`."
            )
        self.in_channels, self.num_atoms, self.num_active = in_channels, num_atoms, num_active
        self.dictionary = nn.Parameter(torch.empty(in_channels, num_atoms))
        self.bias = nn.Parameter(torch.empty(()))
        _init_projection(self.dictionary, self.bias)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense z = sigmoid(Dᵀ t + b): [N, P, C] -> [N, P, K]."""
        return torch.sigmoid(x @ self.dictionary.to(x.dtype) + self.bias.to(x.dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes λ with the layout of `x` and K channels, exactly k non-zero per pixel."""
        z = self.activations(to_pixels(x))  # [N, P, K]
        idx = z.topk(self.num_active, dim=-1).indices  # [N, P, k]
        mask = torch.zeros_like(z).scatter_(-1, idx, 1.0)  # [N, P, K], no gradient
        return from_pixels(z * mask, x)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """t̂ = D λ: codes with K channels -> reconstruction with C channels, same layout."""
        p = to_pixels(codes)  # [N, P, K]
        return from_pixels(p @ self.dictionary.to(p.dtype).t(), codes)  # [N, P, C] -> layout of codes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (codes, reconstruction)."""
        codes = self.encode(x)
        return codes, self.decode(codes)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_atoms={self.num_atoms}, num_active={self.num_active}"


@torch.no_grad()
def srm_targets(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher labels from sparse codes.

    pixel labels y = argmax_K λ  -> [N, H, W] (maps), [N, L] (tokens) or [N] (vectors), long
    image labels g = mean over pixels of λ -> [N, K] in [0, 1]
    """
    p = to_pixels(codes)  # [N, P, K]
    pixel = p.argmax(dim=-1)  # [N, P]
    image = p.mean(dim=1)  # [N, K]
    if codes.dim() == 4:
        pixel = pixel.view(codes.shape[0], *codes.shape[2:])  # [N, H, W]
    elif codes.dim() == 2:
        pixel = pixel.squeeze(1)  # [N]
    return pixel, image


class SRMHead(nn.Module):
    """The student's predictor of one tap's labels: its own `P [Cs, K]` and scalar bias `c`.

    Returns the raw logits Pᵀ s + c with K channels in the layout of the input; `srm_loss` applies the sigmoid.
    Not shared with the teacher's dictionary and no projection to the teacher's channels (that would be FitNet).
    """

    def __init__(self, in_channels: int, num_atoms: int):
        super().__init__()
        self.in_channels, self.num_atoms = in_channels, num_atoms
        self.weight = nn.Parameter(torch.empty(in_channels, num_atoms))
        self.bias = nn.Parameter(torch.empty(()))
        _init_projection(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = to_pixels(x)  # [N, P, Cs]
        return from_pixels(p @ self.weight.to(p.dtype) + self.bias.to(p.dtype), x)  # [N, P, K] -> layout of x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_atoms={self.num_atoms}"


def resize_like(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinearly resize a [N, K, h, w] prediction map to the teacher grid `size` (opt-in, see `allow_resize`)."""
    if logits.dim() != 4 or tuple(logits.shape[2:]) == tuple(size):
        return logits
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
