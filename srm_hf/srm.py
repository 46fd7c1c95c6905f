"""The building blocks of Sparse Representation Matching (Tran, Gabbouj, Iosifidis, arXiv 2103.17012).

`SparseCoder` learns a dictionary over one teacher tap, `srm_targets` turns its sparse codes into labels and `SRMHead`
is the student's predictor of those labels. Feature maps come in three layouts, each a set of "pixels" of C channels:

    maps    [N, C, H, W]  (CNN stages)
    vectors [N, C]        (pooled features; one pixel per image)
    tokens  [N, L, C]     (transformer blocks; each token is a pixel)

Codes and head outputs keep the layout of their input: [N, K, H, W], [N, K] or [N, L, K]. Every operation works in
that layout (1×1 convolutions on maps, matmuls on tokens and vectors): nothing is transposed or copied.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .forward import runs_as_written


def num_atoms_for(channels: int, codeword_multiplier: float) -> int:
    """K = int(m * C): dictionary size for a tap with C channels."""
    return max(1, int(codeword_multiplier * channels))


def num_active_for(channels: int, codeword_multiplier: float, sparsity_multiplier: float) -> int:
    """k = max(1, int(m * s * C)): atoms kept per pixel."""
    return max(1, int(codeword_multiplier * sparsity_multiplier * channels))


def channel_dim(x: torch.Tensor) -> int:
    """Where the channels are: 1 for maps [N, C, H, W], last for tokens [N, L, C] and vectors [N, C]."""
    if x.dim() == 4:
        return 1
    if x.dim() in (2, 3):
        return -1
    raise ValueError(
        f"Expected a feature map [N, C, H, W], tokens [N, L, C] or vectors [N, C]; got shape {tuple(x.shape)}. "
        "Tap a module whose output has one of these layouts."
    )


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per pixel: xᵀ W (+ b), with W [C_in, C_out] and a scalar b; keeps the layout of x."""
    return apply_per_pixel(x, weight.t(), bias)


def apply_per_pixel(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per pixel: M x (+ b), with M [C_out, C_in] (as `nn.Linear` holds it) and a scalar b; keeps the layout of x.
    The bias goes into the convolution or matmul (one kernel, its gradient summed there), not a pass of its own; under
    autocast the output has the autocast dtype, bias included."""
    matrix = matrix.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype).expand(matrix.shape[0])  # the scalar, once per output channel: [C_out]
    if x.dim() == 4:  # 1×1 conv: [N, C_in, H, W] -> [N, C_out, H, W]
        return F.conv2d(x, matrix.view(*matrix.shape, 1, 1), bias)
    channel_dim(x)
    return F.linear(x, matrix, bias)  # [..., C_in] -> [..., C_out]


def _init_projection(weight: torch.Tensor, bias: torch.Tensor) -> None:
    # Kaiming-uniform on the (C, K) tensor (fan-in = K, as torch counts it), scalar bias ~ U(-1, 1).
    nn.init.kaiming_uniform_(weight)
    nn.init.uniform_(bias, -1.0, 1.0)


def top_k_mask(z: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """True where an atom is among the k largest of its pixel: exactly k per pixel, and among atoms of equal value
    the lowest indices first, so the kept set and the pixel label (the first maximal atom, as `argmax` picks it)
    do not depend on how `torch.topk` breaks ties. Under ties at the k-th value the reference keeps them all."""
    kth = z.topk(k, dim=dim).values.narrow(dim, k - 1, 1)  # the k-th largest value per pixel
    above, tied = z > kth, z == kth
    room = k - above.sum(dim, keepdim=True)  # how many of the tied atoms still fit
    return above | (tied & (tied.cumsum(dim) <= room))


class SparseCoder(nn.Module):
    """Dictionary `D [C, K]` with one scalar bias `b`, learnt over one teacher tap.

    encode: a = Dᵀ t + b and z = sigmoid(a) per pixel, then hard top-k: λ = z ⊙ 1[a ≥ a_(k)] with exactly k kept,
            the lowest atom indices first among equal values (`top_k_mask`; the mask carries no gradient). The
            sigmoid is monotone, so ranking a is ranking z, but it is exact: float rounding can make a saturated
            sigmoid tie where a does not, and the fused kernels' sigmoid may differ from torch's by an ulp.
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
        self.bias = nn.Parameter(torch.empty(1))  # one scalar, 1-D so FSDP can shard it
        _init_projection(self.dictionary, self.bias)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense z = sigmoid(Dᵀ t + b): C channels -> K channels, same layout."""
        return torch.sigmoid(project(x, self.dictionary, self.bias))

    def encode(self, x: torch.Tensor, fused: bool = False, projected: bool = False) -> torch.Tensor:
        """Sparse codes λ with the layout of `x` and K channels, exactly k non-zero per pixel; `fused=True` computes
        the sigmoid and top-k in one Triton kernel (`srm_hf.fused_dictionary`), and with `projected=True` the
        projection too where the dictionary allows."""
        if fused:
            from .fused_dictionary import sparse_codes_fused, sparse_codes_projected

            codes = sparse_codes_projected(x, self.dictionary, self.bias, self.num_active) if projected else None
            if codes is not None:
                return codes
            return sparse_codes_fused(project(x, self.dictionary, self.bias), self.num_active)
        a = project(x, self.dictionary, self.bias)
        return torch.sigmoid(a) * top_k_mask(a, self.num_active, channel_dim(a))  # no gradient through the mask

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """t̂ = D λ: codes with K channels -> reconstruction with C channels, same layout."""
        return apply_per_pixel(codes, self.dictionary)  # D [C, K] is already (out, in): no transpose

    def forward(self, x: torch.Tensor, fused: bool = False, projected: bool = False) -> tuple[torch.Tensor, ...]:
        """Returns (codes, reconstruction)."""
        codes = self.encode(x, fused, projected)
        return codes, self.decode(codes)

    def reconstruction_loss(self, x: torch.Tensor, fused: bool = False, projected: bool = False) -> torch.Tensor:
        """Stage 1's loss over this tap: `dictionary_loss(x, self(x)[1])`. `fused=True` runs it through the Triton
        kernels of `srm_hf.fused_dictionary`; with `projected=True` encode, decode and MSE in one where the dictionary
        allows (and this coder is a plain `SparseCoder`: a subclass or forward hooks go through `forward`)."""
        if fused and projected and runs_as_written(self, SparseCoder):
            from .fused_dictionary import dictionary_loss_projected

            loss = dictionary_loss_projected(x, self.dictionary, self.bias, self.num_active)
            if loss is not None:
                return loss
        return dictionary_loss(x, self(x, fused, projected)[1], fused)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, fused: bool = False,
                projected: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's labels for `x`, in float32 whatever its dtype: `srm_targets` of its sparse codes. `fused=True`
        computes the same labels with the Triton kernels of `srm_hf.fused` (the pixel label is the first maximal atom
        in both), and `projected=True` the projection inside the kernel too where the dictionary allows."""
        if fused:
            from .fused import srm_targets_fused, srm_targets_projected

            targets = srm_targets_projected(x, self.dictionary, self.bias, self.num_active) if projected else None
            if targets is not None:
                return targets
            return srm_targets_fused(project(x.float(), self.dictionary, self.bias), self.num_active)
        return srm_targets(self.encode(x.float()))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_atoms={self.num_atoms}, num_active={self.num_active}"


@torch.no_grad()
def srm_targets(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher labels from sparse codes.

    pixel labels y = argmax_K λ  -> [N, H, W] (maps), [N, L] (tokens) or [N] (vectors), long; the first maximal
                 atom under ties (see `top_k_mask`)
    image labels g = mean over pixels of λ -> [N, K] in [0, 1]
    """
    dim = channel_dim(codes)
    pixel = codes.argmax(dim=dim)
    if codes.dim() == 4:
        image = codes.mean(dim=(2, 3))  # [N, K]
    elif codes.dim() == 3:
        image = codes.mean(dim=1)
    else:
        image = codes
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
        self.bias = nn.Parameter(torch.empty(1))  # one scalar, 1-D so FSDP can shard it
        _init_projection(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_atoms={self.num_atoms}"


def resize_like(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinearly resize a [N, K, h, w] prediction map to the teacher grid `size` (opt-in, see `allow_resize`)."""
    if logits.dim() != 4 or tuple(logits.shape[2:]) == tuple(size):
        return logits
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# ---- losses ---------------------------------------------------------------------------------------------------


def dictionary_loss(features: torch.Tensor, reconstruction: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Stage 1: MSE(T, T̂), the mean over all N·C·H·W entries, in float32. No ℓ1 term: sparsity comes from top-k
    alone. `fused=True` reads both in their own dtype in a Triton kernel (`srm_hf.fused_dictionary.mse_fused`) where
    it can."""
    if fused:
        from .fused_dictionary import mse_fused

        loss = mse_fused(reconstruction, features)
        if loss is not None:
            return loss
    return F.mse_loss(reconstruction.float(), features.float())


def srm_loss(
    head_logits: torch.Tensor,
    pixel_labels: torch.Tensor,
    image_labels: torch.Tensor,
    pixel_weight: float = 1.0,
    image_weight: float = 1.0,
    pixel_ce_on_sigmoid: bool = True,
) -> dict[str, torch.Tensor]:
    """Stage 2: the student's head predicts the teacher's sparse-code labels of one tap.

        p = sigmoid(Pᵀ s + c)                      # [N, P, K]
        image term: BCE(mean_pixels p, g)          # g = teacher image labels [N, K]
        pixel term: CE(p, y)                       # y = teacher pixel labels [N, P]

    Paper vs reference code: the reference feeds the *sigmoid outputs* p to the cross-entropy as if they were
    logits, so the pixel term can never fall below log(1 + (K-1)/e). That is the default
    (`pixel_ce_on_sigmoid=True`, what produced the paper's numbers); `False` feeds the raw logits Pᵀ s + c.

    Returns {"pixel": weighted pixel term, "image": weighted image term}; a weight of 0 skips its term.
    """
    logits = head_logits.float()  # [N, K, H, W] / [N, L, K] / [N, K]
    probs = torch.sigmoid(logits)
    if logits.dim() == 3:  # tokens: cross_entropy wants the classes in dim 1
        logits, probs = logits.transpose(1, 2), probs.transpose(1, 2)  # [N, K, L]
    out = {}
    if pixel_weight:
        ce_input = probs if pixel_ce_on_sigmoid else logits  # classes in dim 1, pixels after
        target = pixel_labels.reshape(ce_input.shape[0], *ce_input.shape[2:])  # e.g. a teacher map [N, H, W] for L tokens
        out["pixel"] = pixel_weight * F.cross_entropy(ce_input, target)
    if image_weight:
        image_pred = probs.flatten(2).mean(dim=2) if probs.dim() > 2 else probs  # [N, K]
        out["image"] = image_weight * image_bce(image_pred, image_labels)
    return out


def srm_loss_fused(
    head_logits: torch.Tensor,
    pixel_labels: torch.Tensor,
    image_labels: torch.Tensor,
    pixel_weight: float = 1.0,
    image_weight: float = 1.0,
    pixel_ce_on_sigmoid: bool = True,
) -> dict[str, torch.Tensor]:
    """`srm_loss` through the Triton kernels of `srm_hf.fused_loss` (CUDA, or TRITON_INTERPRET=1): the same terms, with
    no K-channel map kept or materialised in float32 (only [N, K] image predictions leave the kernels), and both
    terms, weights included, one autograd node."""
    from .fused_loss import srm_tap_loss_fused

    pixel, image = srm_tap_loss_fused(head_logits, pixel_labels, image_labels, pixel_weight, image_weight,
                                      pixel_ce_on_sigmoid)
    return {name: value for name, value, weight in (("pixel", pixel, pixel_weight), ("image", image, image_weight))
            if weight}


def srm_loss_projected(features: torch.Tensor, head: SRMHead, pixel_labels: torch.Tensor,
                       image_labels: torch.Tensor, pixel_weight: float = 1.0, image_weight: float = 1.0,
                       pixel_ce_on_sigmoid: bool = True) -> dict[str, torch.Tensor] | None:
    """`srm_loss_fused(head(features), ...)` with the head's projection inside the kernels (`srm_hf.fused_loss`): the
    head's logits are never in memory. None where that does not apply (no Triton, an empty batch)."""
    from .fused_loss import srm_tap_loss_projected

    terms = srm_tap_loss_projected(features, head.weight, head.bias, pixel_labels, image_labels, pixel_weight,
                                   image_weight, pixel_ce_on_sigmoid)
    if terms is None:
        return None
    return {name: value for name, value, weight in zip(("pixel", "image"), terms, (pixel_weight, image_weight))
            if weight}


def image_bce(image_pred: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """BCE(ḡ, g) over [N, K] on probabilities, written out so that it is safe under autocast; ḡ clamped (finite)."""
    image_pred = image_pred.float().clamp(1e-7, 1 - 1e-7)
    target = image_labels.float()
    return -(target * image_pred.log() + (1 - target) * (1 - image_pred).log()).mean()


def pixel_ce_floor(num_atoms: int) -> float:
    """The lowest value of the paper-mode pixel term: log(1 + (K-1)/e), reached by a one-hot p."""
    return math.log(1 + (num_atoms - 1) / math.e)
