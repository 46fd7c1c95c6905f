"""Teacher and student from different libraries, with different channel counts and layouts."""

import math

import pytest
import timm
import torch
from conftest import NUM_LABELS, changed, hf_resnet, make_trainer, snapshot, timm_resnet


def check_trains(trainer):
    before = snapshot(trainer.distill_model)
    trainer.train()
    after = snapshot(trainer.distill_model)
    assert changed(before, after, "student.") and changed(before, after, "method.heads.") and changed(before, after, "method.coders.")
    for pair in trainer.tap_pairs:
        head, coder = trainer.distill_model.method.heads[pair.key], trainer.distill_model.method.coders[pair.key]
        assert head.weight.shape == (pair.student.channels, coder.num_atoms)
        assert coder.dictionary.shape == (pair.teacher.channels, coder.num_atoms)


def test_timm_teacher_to_transformers_student(tmp_path):
    trainer = make_trainer(tmp_path, teacher=timm_resnet(), student=hf_resnet(), srm_mode="joint")
    assert len(trainer.tap_pairs) == 4
    assert any(p.teacher.channels != p.student.channels for p in trainer.tap_pairs)
    check_trains(trainer)


def test_transformers_teacher_to_timm_student(tmp_path):
    trainer = make_trainer(tmp_path, teacher=hf_resnet(hidden_sizes=(16, 32, 48, 64)), student=timm_resnet())
    assert [p.student.path for p in trainer.tap_pairs] == ["layer1", "layer2", "layer3", "global_pool"]
    check_trains(trainer)


def test_cnn_teacher_to_vit_student_tokens(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=NUM_LABELS, img_size=32, patch_size=8)  # 16 patches + class token
    trainer = make_trainer(tmp_path, teacher=timm_resnet(), student=vit, layer_pairs=["layer2:blocks.1"], srm_mode="joint")
    pair = trainer.tap_pairs[0]
    assert pair.teacher.spatial == (4, 4) and pair.student.spatial == (17,)
    check_trains(trainer)


def test_tokens_laid_out_on_the_teacher_grid_are_its_map_in_row_major_order():
    from srm_hf.methods.base import on_teacher_grid

    fmap = torch.randn(2, 5, 3, 4)  # [N, C, H, W]
    tokens = torch.cat([torch.randn(2, 1, 5), fmap.flatten(2).transpose(1, 2)], dim=1)  # a class token, then pixels
    assert torch.equal(on_teacher_grid(tokens, (3, 4)), fmap)
    vector = tokens[:, 0]
    assert on_teacher_grid(fmap, (3, 4)) is fmap and on_teacher_grid(vector, ()) is vector  # other pairs: as they are


@pytest.mark.parametrize("method, extra, regressed", [("fitnet", {"fitnet_max_steps": 2}, "method.regressors."),
                                                      ("at", {}, None)])
def test_position_methods_compare_vit_student_tokens_with_a_cnn_teacher_map(tmp_path, method, extra, regressed):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=NUM_LABELS, img_size=32, patch_size=8)  # 16 patches + class token
    trainer = make_trainer(tmp_path, teacher=timm_resnet(), student=vit, layer_pairs=["layer2:blocks.1"], method=method,
                           max_steps=3, logging_steps=1, **extra)
    before = snapshot(trainer.distill_model)
    trainer.train()
    after = snapshot(trainer.distill_model)
    assert changed(before, after, "student.") and (regressed is None or changed(before, after, regressed))
    term = "hint/mse" if method == "fitnet" else "at/at"
    values = [e[term] for e in trainer.state.log_history if term in e]
    assert values and all(math.isfinite(v) and v > 0 for v in values)


def test_allow_resize_pairs_different_grids(tmp_path):
    trainer = make_trainer(tmp_path, layer_pairs=["layer1:resnet.encoder.stages.1"], allow_resize=True, srm_mode="joint")
    pair = trainer.tap_pairs[0]
    assert pair.teacher.spatial == (8, 8) and pair.student.spatial == (4, 4)
    check_trains(trainer)


def test_a_one_by_one_map_pairs_as_a_pooled_vector(tmp_path):
    # at 32 px the last stage of test_resnet is a 1x1 map: it pairs with a pooled vector, both ways
    trainer = make_trainer(tmp_path, teacher=timm_resnet(), student=timm_resnet(seed=1), srm_mode="joint",
                           layer_pairs=["layer4:global_pool", "global_pool:layer4"])
    assert all(p.teacher.spatial == () and p.student.spatial == () for p in trainer.tap_pairs)
    check_trains(trainer)
