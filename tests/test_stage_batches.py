"""A batch size per stage (`stage_batch_sizes`): each stage trains on its own, epochs count at it, resume is exact."""

import pytest
import torch
from conftest import hf_resnet, make_config, make_trainer
from test_augmentation_resume import PRE, image_split
from transformers import default_data_collator
from transformers.trainer_utils import seed_worker

from srm_hf import DistillationTrainer
from srm_hf.methods import SRM
from srm_hf.stage_batches import StageBatchSampler, loader_options
from srm_hf.stages import StagePlan
from srm_hf.transforms import AugmentedDataset, ImageTransform

SIZES = {"dictionary": 16, "srm": 12}  # the KD stage keeps per_device_train_batch_size (8)


def recording_collator(seen: list):
    def collate(rows):
        seen.append(len(rows))
        return default_data_collator(rows)

    return collate


def test_each_stage_trains_on_its_own_batch_size_and_counts_its_epochs_at_it(tmp_path):
    seen = []
    trainer = make_trainer(tmp_path, stage_batch_sizes=SIZES, srm_dictionary_max_steps=-1, srm_dictionary_epochs=1,
                           srm_max_steps=-1, srm_epochs=1, max_steps=4)
    trainer.data_collator = recording_collator(seen)
    trainer.train()
    # 32 images: one pass is 2 batches of 16, 3 of 12 (the last of 8), then 4 KD steps of 8
    assert [s.steps for s in trainer.plan.stages] == [2, 3, 4]
    assert seen == [1, 1, 1, 16, 16, 12, 12, 8, 8, 8, 8, 8]  # the 1s: the pre-flight checks' one-image examples
    assert trainer.state.global_step == 9


def test_the_reference_preset_selects_per_stage_at_each_stages_own_epochs(tmp_path):
    trainer = make_trainer(tmp_path, preset="reference", eval_strategy="epoch", max_steps=-1, num_train_epochs=2,
                           srm_dictionary_max_steps=-1, srm_dictionary_epochs=2, srm_max_steps=-1, srm_epochs=1,
                           stage_batch_sizes={"dictionary": 32, "srm": 16})
    trainer.train()
    assert [s.steps for s in trainer.plan.stages] == [2, 2, 8]  # 1 step per pass at 32, 2 at 16, 4 at 8
    assert trainer.steps_per_epoch == {"dictionary": 1, "srm": 2, "kd": 4}
    selection = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "history"))
    candidates = {}
    for stage, step, _ in selection.history:  # a candidate at each of the stage's own epochs
        candidates.setdefault(stage, []).append(step)
    assert candidates["dictionary"] == [1, 2] and candidates["srm"] == [4] and candidates["kd"] == [8, 12]


def test_resume_inside_a_stage_with_its_own_batch_size_is_bit_identical(tmp_path):
    def train():
        return AugmentedDataset(image_split(), ImageTransform(PRE, train=True), seed=0)

    config = dict(stage_batch_sizes=SIZES)
    full = make_trainer(tmp_path / "full", train_dataset=train(), save_strategy="steps", save_steps=5, **config)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", train_dataset=train(), student=hf_resnet(seed=7), **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-5"))  # inside stage 2
    a, b = full.distill_model.state_dict(), resumed.distill_model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_later_passes_get_new_views():
    data = AugmentedDataset(image_split(), ImageTransform(PRE, train=True), seed=0)
    n = len(data)
    first, again = data.__getitems__([3, 3 + n])
    assert not torch.equal(first["pixel_values"], again["pixel_values"])
    data.set_epoch(1)
    assert torch.equal(data[3]["pixel_values"], again["pixel_values"])


def test_bad_stage_batch_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"names \['dict'\], which are not stages.*\['dictionary', 'srm', 'kd'\]"):
        make_trainer(tmp_path, stage_batch_sizes={"dict": 8})
    with pytest.raises(ValueError, match=r"\{'srm': 0\} must be positive integers"):
        make_config(tmp_path, stage_batch_sizes='{"srm": 0}')
    assert make_config(tmp_path, stage_batch_sizes=SIZES).for_method("kd").stage_batch_sizes is None
    with pytest.raises(ValueError, match="--compare none"):
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
        import distill

        distill.main(["--output_dir", str(tmp_path / "r"), "--stage_batch_sizes", '{"srm": 16}'])


def test_a_loaded_dictionary_keeps_the_other_stage_sizes(tmp_path):
    from conftest import pretrain_dictionary

    path = pretrain_dictionary(make_trainer(tmp_path / "first"))
    seen = []
    trainer = make_trainer(tmp_path, stage_batch_sizes=SIZES, srm_dictionary_path=path)
    trainer.data_collator = recording_collator(seen)
    trainer.train()
    assert [s.name for s in trainer.plan.stages] == ["srm", "kd"] and seen == [1, 1, 1, 12, 12, 8, 12] + [8] * 4


def test_a_checkpoint_with_other_stage_sizes_is_refused(tmp_path):
    make_trainer(tmp_path, save_strategy="steps", save_steps=6).train()
    other = make_trainer(tmp_path / "other", stage_batch_sizes=SIZES)
    with pytest.raises(ValueError, match="stage_batch_sizes: None there"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))


def first_batch(tmp_path, **config) -> torch.Tensor:
    return next(iter(make_trainer(tmp_path, stage_batch_sizes=SIZES, **config).get_train_dataloader()))["pixel_values"]


def test_data_seed_and_sequential_sampling_reach_the_stage_sampler(tmp_path):
    seeded = first_batch(tmp_path, seed=0, data_seed=1)
    assert torch.equal(seeded, first_batch(tmp_path, seed=5, data_seed=1))  # data_seed, not seed, draws the rows
    assert not torch.equal(seeded, first_batch(tmp_path, seed=0, data_seed=2))
    rows = list(StageBatchSampler(10, StagePlan([(SRM().stages()[0], 3)]), [4], 1, 0, False, False, shuffle=False))
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # in order, for train_sampling_strategy="sequential"


def test_the_stage_loader_takes_the_trainers_loader_options(tmp_path):
    trainer = make_trainer(tmp_path, stage_batch_sizes=SIZES, dataloader_num_workers=2, dataloader_prefetch_factor=3)
    options = loader_options(trainer)
    assert options["prefetch_factor"] == 3 and options["num_workers"] == 2
    assert options["worker_init_fn"].func is seed_worker  # per-worker seeds, as the Trainer's own loader


def test_an_overridden_training_loader_is_refused_under_stage_batch_sizes(tmp_path):
    class OwnLoader(DistillationTrainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=8, collate_fn=default_data_collator)

    trainer = make_trainer(tmp_path, cls=OwnLoader, stage_batch_sizes=SIZES)
    with pytest.raises(ValueError, match="stage_batch_sizes is set, but the training loader.*super\\(\\).get_train"):
        trainer.train()
    assert trainer.state.global_step == 0
