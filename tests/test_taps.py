"""Taps: description by a dry run, automatic candidates, pairing by grid size."""

import pytest
import timm
import torch
from conftest import hf_resnet, small_net, timm_resnet

from srm_hf import describe_taps, pair_taps
from srm_hf.taps import dry_run, format_tap_plan, stage_taps


def test_describe_taps():
    taps = describe_taps(timm_resnet(), torch.randn(2, 3, 32, 32), ["layer2", "global_pool"])
    assert (taps[0].channels, taps[0].spatial, taps[0].reduction) == (48, (4, 4), 8)
    assert (taps[1].channels, taps[1].spatial) == (96, ())
    assert "layer2: 48x4x4" in str(taps[0])


def test_automatic_taps_are_stage_outputs():
    taps, logits = dry_run(hf_resnet(), torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    paths = [t.path for t in stage_taps(taps, min_reduction=4)]
    assert paths == ["resnet.encoder.stages.0", "resnet.encoder.stages.1", "resnet.encoder.stages.2",
                     "resnet.encoder.stages.3", "classifier.0"]
    first = stage_taps(taps, min_reduction=2)[0]
    assert first.path.startswith("resnet.embedder") and first.reduction == 2


def test_pairing_by_spatial_size():
    x = torch.randn(2, 3, 32, 32)
    teacher = stage_taps(dry_run(timm_resnet(), x)[0], 4)
    student = stage_taps(dry_run(hf_resnet(), x)[0], 4)
    pairs = [(p.teacher.path, p.student.path) for p in pair_taps(teacher, student)]
    assert pairs == [("layer1", "resnet.encoder.stages.0"), ("layer2", "resnet.encoder.stages.1"),
                     ("layer3", "resnet.encoder.stages.2"), ("global_pool", "classifier.0")]


def test_automatic_taps_end_the_stages_not_the_stem():
    from transformers import ConvNextConfig, ConvNextForImageClassification, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    bottleneck = ResNetForImageClassification(ResNetConfig(layer_type="bottleneck", embedding_size=16, num_labels=4,
                                                           hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]))
    convnext = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                                             num_labels=4))
    x = torch.randn(2, 3, 64, 64)
    for model, stages in [(bottleneck, "resnet.encoder.stages"), (convnext, "convnext.encoder.stages"),
                          (timm.create_model("test_convnext", num_classes=4), "stages")]:
        maps = [t.path for t in stage_taps(dry_run(model, x)[0], 4) if len(t.spatial) == 2]
        assert maps[:3] == [f"{stages}.{i}" for i in range(3)]  # not the stem, nor the next stage's first layers
    paths = [t.path for t in stage_taps(dry_run(timm.create_model("resnet26", num_classes=4), x)[0], 4)]
    assert paths == ["layer1", "layer2", "layer3", "layer4", "global_pool"]


def test_a_transformers_patch_embedding_is_no_automatic_tap():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=32, num_labels=4))
    x = torch.randn(2, 3, 32, 32)
    taps = stage_taps(dry_run(vit, x)[0], 4)
    assert [t.path for t in taps] == ["vit.layernorm"]  # not the patch projection's 8x8 map, nor its tokens
    with pytest.raises(ValueError, match="(?s)nothing to pair.*layer_pairs"):  # not the CNN's 8x8 stage to that map
        pair_taps(taps, stage_taps(dry_run(hf_resnet(), x)[0], 4))


def test_no_matching_size_is_a_clear_error():
    teacher = stage_taps(dry_run(small_net(), torch.randn(1, 3, 6, 6))[0], 1)  # grids 6x6, 3x3
    student = [t for t in stage_taps(dry_run(hf_resnet(), torch.randn(1, 3, 64, 64))[0], 4) if t.spatial]
    with pytest.raises(ValueError, match="layer_pairs"):
        pair_taps([t for t in teacher if t.spatial], student)


def test_the_tap_plan_reads_as_lines_of_pairs():
    x = torch.randn(2, 3, 32, 32)
    pairs = pair_taps(stage_taps(dry_run(timm_resnet(), x)[0], 4), stage_taps(dry_run(hf_resnet(), x)[0], 4))
    lines = format_tap_plan(pairs).splitlines()
    assert len(lines) == len(pairs) and lines[0].split("->")[0].strip().startswith("layer1: ")
    assert "resnet.encoder.stages.0" in lines[0] and "reduction 4" in lines[0]
    assert format_tap_plan([]).startswith("no taps")


def test_a_vits_attention_heads_are_no_feature_map():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=4)
    x = torch.randn(2, 3, 32, 32)  # 65 tokens, head_dim 64: q and k are [2, 3, 65, 64], nearly square
    taps = dry_run(vit, x)[0]
    assert [t.path for t in taps if len(t.spatial) == 2] == ["patch_embed.proj"]
    pairs = pair_taps(stage_taps(dry_run(timm_resnet(), x)[0], 4), stage_taps(taps, 4))
    assert [(p.teacher.path, p.student.path) for p in pairs] == [("global_pool", "head_drop")]  # pooled vectors only
