"""`recipes/benchmarks/target_precision.py`: what bf16 targets would change, and that it names ties as ties."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "benchmarks"))

from target_precision import compare, main  # noqa: E402

from srm_hf.srm import SparseCoder  # noqa: E402


def test_a_label_that_bf16_rounding_ties_is_counted_at_a_tie():
    coder = SparseCoder(in_channels=2, num_atoms=4, num_active=1)
    with torch.no_grad():
        coder.dictionary.copy_(torch.tensor([[1.0, 0.0, -1.0, -1.0], [0.0, 1.0, -1.0, -1.0]]))
        coder.bias.zero_()
    # pixel 0: a = (1.0, 1.001): atom 1 in float32, a tie after rounding to bf16 (atom 0 wins); pixel 1: clear
    feature = torch.tensor([[1.0, 0.2], [1.001, 1.0]]).view(1, 2, 1, 2)
    row = compare(coder, feature)
    assert (row["pixels"], row["differ"], row["differ_at_ties"], row["ties"]) == (2, 1, 1, 1)
    assert row["image_max_diff"] > 0.3  # the kept atom moved: its image label went to the other atom


def test_the_script_writes_a_row_per_tap(tmp_path):
    out = tmp_path / "precision.md"
    main(["--images_per_class", "3", "--dictionary_steps", "2", "--eval_images", "20", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "grid" not in line]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["layer1", "layer2", "layer3", "global_pool"]
    for r in rows:
        differ, pixels = (int(v) for v in r.split(" | ")[3].split(" (")[0].split(" of "))
        assert 0 <= differ <= pixels and pixels == 20 * {"layer1": 49, "layer2": 16, "layer3": 4}.get(
            r.split(" | ")[0].strip("| "), 1)
