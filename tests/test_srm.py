import math

import pytest
import torch

from srm_hf import SparseCoder, SRMHead, srm_targets
from srm_hf.srm import num_active_for, num_atoms_for


def sig(x):
    return 1 / (1 + math.exp(-x))


def coder_with(dictionary, bias=0.0, num_active=2):
    c, k = len(dictionary), len(dictionary[0])
    coder = SparseCoder(c, k, num_active)
    with torch.no_grad():
        coder.dictionary.copy_(torch.tensor(dictionary, dtype=torch.float32))
        coder.bias.fill_(bias)
    return coder


def test_sizes_follow_m_and_s():
    assert num_atoms_for(64, 2.0) == 128
    assert num_active_for(64, 2.0, 0.02) == 2  # int(2 * 0.02 * 64) = int(2.56)
    assert num_active_for(8, 2.0, 0.02) == 1  # never below one atom


def test_init_matches_reference():
    torch.manual_seed(0)
    coder = SparseCoder(16, 32, 1)
    bound = math.sqrt(6 / 32)  # kaiming-uniform, fan-in = K
    assert coder.dictionary.shape == (16, 32) and coder.bias.shape == (1,)
    assert coder.dictionary.abs().max() <= bound and coder.dictionary.abs().max() > 0.8 * bound
    assert -1 <= coder.bias.item() <= 1


def test_encode_decode_by_hand_on_vectors():
    # D = [[1, -1, 0], [0, 0, 2]], t = [1, 0]: Dᵀt = [1, -1, 0], z = sigmoid, top-2 keeps atoms 0 and 2.
    coder = coder_with([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]])
    codes = coder.encode(torch.tensor([[1.0, 0.0]]))  # pooled [N, C] input
    expected = torch.tensor([[sig(1), 0.0, 0.5]])
    torch.testing.assert_close(codes, expected)
    torch.testing.assert_close(coder.decode(codes), torch.tensor([[sig(1), 1.0]]))


def test_bias_is_one_scalar_shared_by_atoms():
    coder = coder_with([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]], bias=1.0, num_active=3)
    codes = coder.encode(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(codes, torch.tensor([[sig(2), sig(0), sig(1)]]))


def test_topk_with_ties_keeps_exactly_k():
    coder = coder_with([[1.0, 1.0, 1.0, 1.0]], num_active=2)  # every atom scores the same
    codes = coder.encode(torch.ones(5, 1))
    assert ((codes > 0).sum(dim=-1) == 2).all()
    torch.testing.assert_close(codes.sum(-1), torch.full((5,), 2 * sig(1)))


def test_k_equals_one_keeps_the_max():
    torch.manual_seed(0)
    coder = SparseCoder(6, 10, 1)
    x = torch.randn(3, 6)
    codes = coder.encode(x)
    z = torch.sigmoid(x @ coder.dictionary + coder.bias)
    assert ((codes > 0).sum(-1) == 1).all()
    torch.testing.assert_close(codes.max(-1).values, z.max(-1).values)
    assert (codes.argmax(-1) == z.argmax(-1)).all()


def test_layouts_agree_pixel_by_pixel():
    torch.manual_seed(0)
    coder = SparseCoder(4, 8, 2)
    fmap = torch.randn(2, 4, 3, 5)  # [N, C, H, W]
    codes = coder.encode(fmap)
    assert codes.shape == (2, 8, 3, 5)
    pixel = fmap[1, :, 2, 4][None]  # one pixel as a pooled vector [1, C]
    torch.testing.assert_close(codes[1, :, 2, 4], coder.encode(pixel)[0])
    tokens = fmap.flatten(2).transpose(1, 2)  # [N, L, C]
    torch.testing.assert_close(coder.encode(tokens), codes.flatten(2).transpose(1, 2))
    recon = coder.decode(codes)
    assert recon.shape == fmap.shape
    torch.testing.assert_close(recon[1, :, 2, 4], coder.decode(coder.encode(pixel))[0])


def test_mask_carries_no_gradient_but_kept_atoms_do():
    coder = coder_with([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]])
    codes, recon = coder(torch.tensor([[1.0, 0.0]]))
    recon.sum().backward()
    assert coder.dictionary.grad is not None and coder.dictionary.grad.abs().sum() > 0
    # atom 1 was dropped by top-k: its column gets gradient only through decode, which multiplies by λ_1 = 0
    torch.testing.assert_close(coder.dictionary.grad[:, 1], torch.zeros(2))


def test_invalid_sparsity_is_a_clear_error():
    with pytest.raises(ValueError, match="num_active"):
        SparseCoder(4, 3, 5)


def test_targets_by_hand():
    codes = torch.tensor([[[[0.9, 0.0]], [[0.0, 0.7]], [[0.2, 0.0]]]])  # [N=1, K=3, H=1, W=2]
    pixel, image = srm_targets(codes)
    assert pixel.dtype == torch.long and pixel.tolist() == [[[0, 1]]]
    torch.testing.assert_close(image, torch.tensor([[0.45, 0.35, 0.1]]))


def test_targets_of_vectors_and_tokens():
    vec = torch.tensor([[0.1, 0.8, 0.0], [0.5, 0.0, 0.6]])  # [N, K]
    pixel, image = srm_targets(vec)
    assert pixel.tolist() == [1, 2]
    torch.testing.assert_close(image, vec)
    tokens = torch.tensor([[[0.1, 0.8], [0.9, 0.0]]])  # [N=1, L=2, K=2]
    pixel, image = srm_targets(tokens)
    assert pixel.tolist() == [[1, 0]]
    torch.testing.assert_close(image, torch.tensor([[0.5, 0.4]]))


def test_head_by_hand():
    head = SRMHead(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]]))
        head.bias.fill_(0.5)
    s = torch.tensor([[[[1.0]], [[3.0]]]])  # [N=1, Cs=2, 1, 1]
    out = head(s)
    assert out.shape == (1, 3, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([7.5, 3.5, -0.5]))
    assert head(torch.randn(4, 5, 2)).shape == (4, 5, 3)  # tokens


@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (2, 5, 6), (3, 6)])
def test_targets_shortcut_equals_labels_of_the_codes(shape):
    torch.manual_seed(0)
    coder = SparseCoder(6, 12, 3)
    x = torch.randn(*shape)
    if len(shape) == 3:
        x = torch.randn(2, 5, 6)  # tokens [N, L, C]
    pixel, image = coder.targets(x)
    ref_pixel, ref_image = srm_targets(coder.encode(x))
    assert torch.equal(pixel, ref_pixel)
    torch.testing.assert_close(image, ref_image)


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (2, 7, 4), (9, 4)])
def test_pixel_labels_agree_under_exact_ties(shape):
    # atoms 0, 2 and 5 are the same vector (and 1, 4): their activations tie exactly at every pixel, so the kept set
    # and the label hinge on the tie-break. Both paths must label the lowest-index kept atom of largest value.
    torch.manual_seed(1)
    base = torch.randn(4, 3)
    coder = coder_with(base[:, [0, 1, 0, 2, 1, 0]].tolist(), bias=0.3, num_active=2)
    x = torch.randn(*shape)
    pixel, image = coder.targets(x)
    codes = coder.encode(x)
    ref_pixel, ref_image = srm_targets(codes)
    assert torch.equal(pixel, ref_pixel)
    torch.testing.assert_close(image, ref_image)
    z = coder.activations(x).movedim(1, -1) if x.dim() == 4 else coder.activations(x)  # [..., K]
    kept = (codes.movedim(1, -1) if x.dim() == 4 else codes) != 0
    flat_z, flat_kept = z.reshape(-1, 6), kept.reshape(-1, 6)
    ties = 0
    for values, mask in zip(flat_z.tolist(), flat_kept.tolist()):
        order = sorted(range(6), key=lambda i: (-values[i], i))  # largest first, lowest index first among equals
        assert [i for i in range(6) if mask[i]] == sorted(order[:2])
        ties += values.count(values[order[0]]) > 1
    assert ties > 0  # the case under test happens
    flat_pixel = pixel.reshape(-1).tolist()
    assert flat_pixel == [min(range(6), key=lambda i: (-v[i], i)) for v in flat_z.tolist()]  # the first maximal atom
