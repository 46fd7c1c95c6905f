"""Bad input fails at construction, before any training, with the input and the fix named."""

import math

import re

import pytest
import torch
import torch.nn as nn
from conftest import NUM_LABELS, PatternDataset, hf_resnet, make_config, make_trainer, pretrain_dictionary, timm_resnet
from safetensors.torch import load_file
from transformers import TrainingArguments

from srm_hf import DistillationTrainer, Method, StageSpec


class OddGridNet(nn.Module):
    """Feature grids 10x10 and 5x5 on 32x32 inputs, pooled functionally: nothing matches a ResNet's grids."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=3)
        self.conv2 = nn.Conv2d(8, 16, 2, stride=2)
        self.fc = nn.Linear(16, NUM_LABELS)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x).relu()).relu().mean((2, 3)))


def test_unknown_layer_name(tmp_path):
    with pytest.raises(ValueError) as err:
        make_trainer(tmp_path, layer_pairs=["layer_3:resnet.encoder.stages.1"])
    assert "layer_3" in str(err.value) and "'layer3'" in str(err.value)
    with pytest.raises(ValueError, match="resnet.encoder.stages.1"):
        make_trainer(tmp_path, layer_pairs=["layer3:resnet.encoder.stage.1"])


def test_no_spatially_matching_pair(tmp_path):
    with pytest.raises(ValueError) as err:
        make_trainer(tmp_path, student=OddGridNet())
    msg = str(err.value)
    assert "spatial size" in msg and "layer_pairs" in msg and "conv2: 16x5x5" in msg and "layer1: 32x8x8" in msg


def test_explicit_pair_of_different_grids(tmp_path):
    with pytest.raises(ValueError, match="allow_resize"):
        make_trainer(tmp_path, layer_pairs=["layer1:resnet.encoder.stages.1"])


def test_label_count_mismatch(tmp_path):
    with pytest.raises(ValueError) as err:
        make_trainer(tmp_path, student=hf_resnet(num_labels=NUM_LABELS + 1))
    assert f"{NUM_LABELS} labels" in str(err.value) and "num_labels" in str(err.value)


def test_missing_teacher_and_wrong_args(tmp_path):
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=hf_resnet(), args=make_config(tmp_path), train_dataset=PatternDataset(8))
    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(),
                            args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=PatternDataset(8))


def test_samples_without_pixel_values(tmp_path):
    class Tuples(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 32, 32), "label": 0}

    with pytest.raises(ValueError, match="pixel_values"):
        make_trainer(tmp_path, train_dataset=Tuples())


def test_dictionary_from_another_teacher(tmp_path):
    first = make_trainer(tmp_path / "a", srm_dictionary_max_steps=1)
    pretrain_dictionary(first)
    with pytest.raises(ValueError, match="does not fit"):
        make_trainer(tmp_path / "b", teacher=hf_resnet(hidden_sizes=(16, 32, 48, 64)),
                     srm_dictionary_path=str(tmp_path / "a" / "out" / "srm_dictionary.safetensors"))


def test_a_dictionary_of_another_teacher_of_the_same_shapes_or_another_k_is_refused(tmp_path):
    path = pretrain_dictionary(make_trainer(tmp_path / "a", srm_dictionary_max_steps=1))
    with pytest.raises(ValueError, match="does not fit.*teacher: .* there, .* here"):  # same architecture, retrained
        make_trainer(tmp_path / "b", teacher=timm_resnet(seed=5), srm_dictionary_path=path)
    with pytest.raises(ValueError, match="does not fit.*kept: "):  # k = int(m·s·C) of another s
        make_trainer(tmp_path / "c", srm_sparsity_multiplier=0.5, srm_dictionary_path=path)
    trainer = make_trainer(tmp_path / "d", srm_dictionary_path=str(tmp_path / "a" / "out"))  # its folder will do
    assert trainer.method.dictionary_ready and "dictionary" not in [s.name for s in trainer.method.stages()]


def test_a_dictionary_is_saved_only_once_stage_1_has_finished_here_or_in_the_checkpoint_resumed(tmp_path):
    path = tmp_path / "dictionary.safetensors"
    first = make_trainer(tmp_path / "a", srm_dictionary_max_steps=2, srm_max_steps=1, max_steps=1,
                         save_strategy="steps", save_steps=1)
    with pytest.raises(RuntimeError, match=r"not learnt yet.*train_stages\(\['dictionary'\]\)"):
        first.method.save_dictionary(str(path))  # random atoms: a run loading them would skip stage 1
    assert not path.exists()
    first.train()
    first.method.save_dictionary(str(path))

    def resumed_from(step):
        trainer = make_trainer(tmp_path / "a", srm_dictionary_max_steps=2, srm_max_steps=1, max_steps=1)
        finished, told = [], trainer.method.stage_finished
        trainer.method.stage_finished = lambda stage: (finished.append(stage.name), told(stage))
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / f"checkpoint-{step}"))
        return trainer, finished

    inside, finished = resumed_from(1)  # stage 1 half done in the checkpoint, finished after resuming
    assert finished == ["dictionary", "srm", "kd"] and inside.method.dictionary_learnt
    past, finished = resumed_from(3)  # only the KD stage left: each earlier stage is told once, in order
    assert finished == ["dictionary", "srm", "kd"]
    past.method.save_dictionary(str(path))
    torch.testing.assert_close(load_file(path), {k: v.cpu() for k, v in first.method.coders.state_dict().items()})


def test_missing_dictionary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        make_trainer(tmp_path, srm_dictionary_path=str(tmp_path / "nowhere.safetensors"))


@pytest.mark.parametrize("sized", [False, True])
def test_an_iterable_train_dataset_is_refused_before_the_models_load(tmp_path, sized):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(PatternDataset(8))

    if sized:  # a stream of known size: torch's Dataset base class has a `__getitem__` that only raises
        Stream.__len__ = lambda self: 8
    with pytest.raises(ValueError, match="train_dataset is a Stream, an iterable or streaming.*map-style dataset"):
        DistillationTrainer(model="no/such/student", teacher_model=timm_resnet(), args=make_config(tmp_path),
                            train_dataset=Stream())


class OwnTemperature(Method):
    """A method that keeps a learnable parameter on itself rather than in a child module."""

    name = "own_temperature"

    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))

    def stages(self):
        return [StageSpec("kd")]


def frozen(model):
    return model.requires_grad_(False)


@pytest.mark.parametrize("build, match", [
    (lambda t: dict(model=t, teacher_model=t), "teacher and the student are one model"),
    (lambda t: dict(model=frozen(hf_resnet()), teacher_model=t), "No parameter of the student.*requires grad"),
    (lambda t: dict(model=hf_resnet(), teacher_model=t, method=OwnTemperature()), r"parameters \['log_t'\] directly"),
    (lambda t: dict(model=hf_resnet(), teacher_model=t, train_dataset=PatternDataset(0)), "train_dataset is empty"),
    (lambda t: dict(model=hf_resnet().to("meta"), teacher_model=t), "student's parameters are on the meta device"),
    (lambda t: dict(model=hf_resnet(), teacher_model=t, train_dataset=PatternDataset(8, channels=1)),
     r"teacher \(ResNet\) cannot take the first training images \(pixel_values torch.float32 of shape \(2, 1, 32"),
    (lambda t: dict(model=hf_resnet(), teacher_model=t, train_dataset=AsBytes(8)),
     r"'pixel_values' is torch.uint8.*float tensor"),
])
def test_models_methods_and_batches_that_cannot_train_are_refused_when_the_trainer_is_built(tmp_path, build, match):
    kwargs = {"args": make_config(tmp_path, method="kd"), "train_dataset": PatternDataset(8), **build(timm_resnet())}
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(**kwargs)


class AsBytes(PatternDataset):
    def __getitem__(self, i):
        return {"pixel_values": (self.images[i].clamp(-2, 2) * 60 + 128).to(torch.uint8), "labels": self.labels[i]}


def test_a_method_instance_serves_one_trainer_and_terms_must_be_scalars(tmp_path):
    from srm_hf.methods import KD

    method = KD.from_config(make_config(tmp_path, method="kd"))
    DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=method,
                        args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))
    with pytest.raises(ValueError, match="KD instance is already built for another trainer.*KD.from_config"):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=method,
                            args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))

    class PerSample(KD):
        def loss(self, stage, student, teacher, labels):
            return {"ce": nn.functional.cross_entropy(student.logits, labels, reduction="none")}

    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=PerSample(),
                                  args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))
    with pytest.raises(ValueError, match=r"not scalars \(\{'ce': \(8,\)\}\).*\.mean\(\)"):
        trainer.train()
    for returned, named in (({"ce": 0.0}, "{'ce': 'float'}"), (torch.ones(()), "Tensor"), ({}, "{}")):
        class Wrong(KD):
            def loss(self, stage, student, teacher, labels, returned=returned):
                return returned

        trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=Wrong(),
                                      args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))
        with pytest.raises(TypeError, match=f"returned {re.escape(named)} from loss\\(\\) in stage 'kd'.*non-empty "
                                            "dict of scalar tensors"):
            trainer.train()


def test_a_stage_is_never_run_alone_before_what_it_builds_on(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"train_stages\(\['srm'\]\) would run before stage \['dictionary'\]"):
        trainer.train_stages(["srm"])
    with pytest.raises(ValueError, match="has no stage"):
        trainer.train_stages([])
    assert trainer.state.global_step == 0


def test_batch_features_dict_outputs_and_a_bfloat16_teacher_train(tmp_path):
    from transformers import BatchFeature

    class DictOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = hf_resnet()

        def forward(self, pixel_values):
            logits = self.net(pixel_values).logits
            return {"pooled": torch.zeros(len(logits), 16), "logits": logits}

    def collate(samples):
        return BatchFeature({"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                             "labels": torch.stack([s["labels"] for s in samples])})

    trainer = DistillationTrainer(model=DictOutput(), teacher_model=timm_resnet().to(torch.bfloat16),
                                  args=make_config(tmp_path, method="kd", max_steps=2), data_collator=collate,
                                  train_dataset=PatternDataset(16))
    trainer.train()
    assert trainer.state.global_step == 2 and all(math.isfinite(e["kd/kd"]) for e in trainer.state.log_history
                                                  if "kd/kd" in e)


def test_a_method_instance_is_free_again_when_its_trainer_could_not_be_built(tmp_path):
    from srm_hf.methods import KD

    method = KD.from_config(make_config(tmp_path, method="kd"))
    with pytest.raises(TypeError):  # a mistyped keyword: the Trainer refuses it after the method was built
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=method, train_datset=None,
                            args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))
    DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), method=method,
                        args=make_config(tmp_path, method="kd"), train_dataset=PatternDataset(8))


def test_a_teacher_forward_override_that_runs_the_teacher_itself_still_feeds_the_taps(tmp_path):
    from srm_hf.methods import Features

    class FlipAveraged(DistillationTrainer):
        def teacher_forward(self, inputs):
            x = inputs["pixel_values"]
            with torch.no_grad():
                flipped = self.teacher(x.flip(-1))
                logits = (self.teacher(x) + flipped) / 2  # the taps keep the last forward's maps
            return Features(logits, self.teacher_hooks.pop())

    trainer = FlipAveraged(model=hf_resnet(), teacher_model=timm_resnet(), train_dataset=PatternDataset(16),
                           args=make_config(tmp_path, srm_mode="joint", srm_dictionary_max_steps=1, max_steps=1))
    trainer.train()
    assert trainer.state.global_step == 2
