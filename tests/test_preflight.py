"""Bad input fails before any compute, naming the file or folder; nothing already written is lost."""

import builtins
import errno
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import timm
from conftest import PatternDataset, hf_resnet, make_config, make_trainer, timm_resnet
from PIL import Image
from test_data import make_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import distill  # noqa: E402

from srm_hf import preflight  # noqa: E402
from srm_hf.argparser import SRMParser  # noqa: E402
from srm_hf.data import DataArguments, load_image_splits  # noqa: E402
from srm_hf.loading import load_image_classifier  # noqa: E402

RUN = ["--srm_dictionary_max_steps", "2", "--srm_max_steps", "2", "--max_steps", "2", "--per_device_train_batch_size",
       "4", "--report_to", "none", "--disable_tqdm", "true", "--compare", "none", "--report", "false"]
TINY = [*RUN, "--train_teacher", "true", "--teacher_max_steps", "2"]


def split_folder(root: Path, per_class: int = 4) -> Path:
    make_image_folder(root / "train", per_class=per_class)
    make_image_folder(root / "test", per_class=2)
    return root


def run_recipe(data: Path, out: Path, *extra: str):
    distill.main(["--dataset_dir", str(data), "--output_dir", str(out), *TINY, *extra])


def test_a_corrupt_test_image_stops_the_recipe_before_training_naming_the_file(tmp_path):
    data = split_folder(tmp_path / "data")
    (data / "test" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"test/dog/1\.png.*split 'test'.*nothing was trained"):
        run_recipe(data, tmp_path / "out")
    assert not (tmp_path / "out" / "teacher").exists()  # not even the teacher was trained


def test_an_empty_validation_split_stops_the_recipe_before_training(tmp_path):
    data = split_folder(tmp_path / "data", per_class=1)  # one training image per class: nothing to carve
    with pytest.raises(ValueError, match="Split 'validation' .* is empty.*--validation_split"):
        run_recipe(data, tmp_path / "out")
    assert not (tmp_path / "out" / "teacher").exists()


def test_a_read_only_output_folder_stops_the_recipe_before_training(tmp_path, monkeypatch):
    data, out = split_folder(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    out.chmod(0o555)
    if os.geteuid() == 0:  # permission bits do not bind root: inject what a read-only file system answers
        def read_only(path, *args, **kwargs):
            if str(path).startswith(str(out)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return builtins.open(path, *args, **kwargs)

        monkeypatch.setattr(preflight, "open", read_only, raising=False)
    try:
        with pytest.raises(PermissionError, match=f"Cannot write to output_dir '{out}'.*nothing was trained"):
            run_recipe(data, out)
    finally:
        out.chmod(0o755)
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_an_output_dir_gone_unwritable_is_refused_by_the_trainer_before_any_step(tmp_path):
    trainer = make_trainer(tmp_path)
    out = Path(trainer.args.output_dir)
    if out.exists():
        out.rmdir()
    out.write_text("a file where the output folder should be")
    with pytest.raises(PermissionError, match=f"Cannot write to output_dir '{out}'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_no_room_for_a_checkpoint_is_refused_before_any_step(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=2)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 1000})())
    with pytest.raises(OSError, match=r"has 0\.0 MiB free, and this run needs about"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_last_batch_of_one_is_refused_where_batchnorm_would_train_on_it(tmp_path):
    trainer = make_trainer(tmp_path, train_dataset=PatternDataset(17))  # batches of 8: 8, 8, 1
    with pytest.raises(ValueError, match="17 examples.*holds one example.*dataloader_drop_last=True"):
        trainer.train()
    assert trainer.state.global_step == 0
    make_trainer(tmp_path, train_dataset=PatternDataset(17), dataloader_drop_last=True, max_steps=1,
                 srm_dictionary_max_steps=1, srm_max_steps=1).train()


@pytest.mark.parametrize("n, options, match", [
    (3, dict(dataloader_drop_last=True), "drop_last=True drops every batch.*3 examples.*batch of 8"),
    (12, dict(dataloader_drop_last=True, stage_batch_sizes={"dictionary": 16}), "fewer than one batch of 16"),
    (8, dict(per_device_train_batch_size=1), "every batch holds one example.*batches of 2 or more"),
    (1, dict(), "1 examples.*every batch holds one example.*batches of 2 or more"),
])
def test_batches_that_train_nothing_or_one_image_under_batchnorm_are_refused_before_any_step(tmp_path, n, options,
                                                                                           match):
    trainer = make_trainer(tmp_path, train_dataset=PatternDataset(n), **options)
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_batch_of_one_image_per_process_is_refused_under_several_processes_too():
    images = PatternDataset(4).images  # hf_resnet: BatchNorm at a 1x1 map for 32 px images
    with pytest.raises(ValueError, match="64 examples: every batch holds one example"):
        preflight.check_last_batch(hf_resnet(), images, 64, 1, 2, drop_last=False)
    preflight.check_last_batch(hf_resnet(), images, 17, 8, 2, drop_last=False)  # padded by accelerate


def relabelled(n: int, labels) -> PatternDataset:
    dataset = PatternDataset(n)
    dataset.labels = labels
    return dataset


@pytest.mark.parametrize("split, dataset, match", [
    ("train", relabelled(16, torch.arange(16) % 4 + 4), r"training set has labels \[4\] outside 0-3"),
    ("train", relabelled(16, (torch.arange(16) % 4).float()), "labels are torch.float32 of shape \\(1,\\).*int64"),
    ("train", relabelled(16, torch.eye(4)[torch.arange(16) % 4]), "shape \\(1, 4\\).*class indices"),  # one-hot
    ("eval", relabelled(16, torch.arange(16) % 4 - 1), r"evaluation set has labels \[-1\] outside"),
])
def test_labels_the_losses_cannot_take_are_refused_before_any_step(tmp_path, split, dataset, match):
    trainer = make_trainer(tmp_path, **({"train_dataset": dataset} if split == "train" else {}))
    if split == "eval":
        trainer.eval_dataset = dataset
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_bad_label_past_the_first_sample_of_a_plain_dataset_is_named_as_its_batch_is_collated(tmp_path):
    labels = torch.arange(32) % 4
    labels[21] = 7  # only sample 0 is read before training: the batch holding 21 fails, named, not inside the loss
    trainer = make_trainer(tmp_path, train_dataset=relabelled(32, labels), method="kd", max_steps=8)
    with pytest.raises(ValueError, match=r"A batch of 8 samples has labels \[7\] outside 0-3.*Remap the labels"):
        trainer.train()
    assert trainer.state.global_step < 8
    trainer = make_trainer(tmp_path, method="kd", max_steps=1, eval_strategy="steps", eval_steps=1)
    trainer.eval_dataset = relabelled(16, torch.arange(16) % 4 - (torch.arange(16) == 9).long() * 5)  # one -1 ... -4
    with pytest.raises(ValueError, match=r"A batch of \d+ samples has labels \[-4\] outside 0-3"):
        trainer.train()


def test_images_of_other_sizes_past_the_first_sample_are_named_as_their_batch_is_collated(tmp_path):
    class MixedSizes(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            size = 32 if i < 10 else 24
            return {"pixel_values": torch.rand(3, size, size), "labels": i % 4}

    trainer = make_trainer(tmp_path, train_dataset=MixedSizes(), method="kd", max_steps=2, seed=0,
                           train_sampling_strategy="sequential")
    with pytest.raises(ValueError, match=r"A batch of 8 training samples holds 'pixel_values' of 2 shapes \(\[\(3, 24, "
                                         r"24\), \(3, 32, 32\)\]\).*Resize them"):
        trainer.train()


def test_a_datasets_label_column_is_read_whole_unless_a_transform_maps_it(tmp_path):
    from datasets import Dataset

    images = PatternDataset(12).images
    data = Dataset.from_dict({"pixel_values": images.numpy(), "labels": [0, 1, 2, 3] * 2 + [0, 1, 2, 7]})
    # python lists (no "torch" / "numpy" format: datasets 3.6's formatters import a reader newer torchvision lacks)
    trainer = make_trainer(tmp_path, train_dataset=data)
    with pytest.raises(ValueError, match=r"labels \[7\] outside 0-3"):
        trainer.train()

    def one_based(batch):  # the column holds 1-4; the samples give 0-3
        return {"pixel_values": torch.as_tensor(batch["pixel_values"]), "labels": [v - 1 for v in batch["labels"]]}

    data = Dataset.from_dict({"pixel_values": images.numpy(), "labels": [1, 2, 3, 4] * 3}).with_transform(one_based)
    make_trainer(tmp_path, train_dataset=data, method="kd", max_steps=1).train()
    # stage_batch_sizes naming every stage: per_device_train_batch_size (1 here) is no batch size of the run
    make_trainer(tmp_path, method="kd", max_steps=1, per_device_train_batch_size=1, stage_batch_sizes={"kd": 4}).train()


def test_the_last_batch_check_runs_a_compiled_student_eagerly(tmp_path):
    """Its one-image forward adds BatchNorm hooks for a moment: compiling a graph with them would leave it behind."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = make_trainer(tmp_path, train_dataset=PatternDataset(17), compile_student=True,
                           torch_compile_backend="aot_eager")
    with pytest.raises(ValueError, match="17 examples.*holds one example"):
        trainer.train()
    assert counters["stats"]["unique_graphs"] == 0
    torch._dynamo.reset()


class Unlabelled(PatternDataset):
    def __getitem__(self, i):
        return {"pixel_values": self.images[i]}


@pytest.mark.parametrize("method, extra, fix", [("alone", {}, "label column."), ("srm", {"kd_alpha": 0.0}, "kd_alpha > 0")])
def test_a_stage_that_learns_from_labels_alone_needs_labels_before_any_step(tmp_path, method, extra, fix):
    trainer = make_trainer(tmp_path, method=method, train_dataset=Unlabelled(32), **extra)
    with pytest.raises(ValueError, match=f"trains on the class labels alone.*no 'labels'.*{fix}"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_an_oversized_image_is_named(tmp_path):
    make_image_folder(tmp_path / "data")
    Image.new("L", (300, 200)).save(tmp_path / "data" / "owl" / "big.png")
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data"), validation_fraction=0.34))
    with pytest.raises(ValueError, match=r"big\.png.*300×200 pixels, over the limit of 10000"):
        for name in ("train", "validation"):
            preflight.check_images(getattr(splits, name), name, max_pixels=10_000)
    for name in ("train", "validation"):
        preflight.check_images(getattr(splits, name), name)  # within PIL's own limit


def test_image_folders_with_an_empty_class_or_a_single_class_are_refused(tmp_path):
    make_image_folder(tmp_path / "a")
    (tmp_path / "a" / "yak").mkdir()
    with pytest.raises(ValueError, match=r"\['.*/a/yak'\] hold no images"):
        load_image_splits(DataArguments(dataset_dir=str(tmp_path / "a")))
    make_image_folder(tmp_path / "b", classes=("cat",))
    with pytest.raises(ValueError, match=r"1 class subfolder\(s\) \['cat'\].*two classes or more"):
        load_image_splits(DataArguments(dataset_dir=str(tmp_path / "b")))


def test_negative_labels_are_not_a_class(tmp_path):
    from datasets import Dataset, DatasetDict

    from srm_hf.class_labels import as_class_labels

    ds = Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)] * 3, "label": [0, 1, -1]})
    with pytest.raises(ValueError, match=r"negative labels \[-1\].*filter"):
        as_class_labels(DatasetDict({"train": ds}))
    ds = Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)] * 3, "label": [0, 1, None]})
    with pytest.raises(ValueError, match=r"missing \(null\) labels.*filter"):  # not a class named "None"
        as_class_labels(DatasetDict({"train": ds}))


def test_a_teacher_trained_on_other_label_names_is_refused(tmp_path):
    data = split_folder(tmp_path / "data")
    teacher = timm.create_model("resnet10t", num_classes=3, pretrained=False)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "label_names": ["dog", "cat", "owl"]}
    from srm_hf.checkpoint import save_student

    save_student(teacher, str(tmp_path / "teacher"))
    assert load_image_classifier(str(tmp_path / "teacher")).pretrained_cfg["label_names"] == ["dog", "cat", "owl"]
    with pytest.raises(ValueError, match=r"trained on the labels \['dog', 'cat', 'owl'\].*\['cat', 'dog', 'owl'\]"):
        distill.main(["--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), *RUN,
                      "--teacher_model_name_or_path", str(tmp_path / "teacher")])


def test_the_teacher_cache_is_retrained_for_other_data(tmp_path, monkeypatch):
    trained = []

    def fake_train_teacher(teacher_args, data_args, config, folder):
        trained.append(data_args.dataset_dir)
        model = timm.create_model("resnet10t", num_classes=3, pretrained=False)
        from srm_hf.checkpoint import save_student

        save_student(model, folder)
        splits = load_image_splits(data_args)
        with open(os.path.join(folder, "teacher_recipe.json"), "w") as f:
            json.dump({"teacher_args": distill.dataclasses.asdict(teacher_args),
                       "data": distill.data_signature(data_args), "label_names": splits.label_names,
                       "train_fingerprint": splits.fingerprint}, f)

    monkeypatch.setattr(distill, "train_teacher", fake_train_teacher)
    first, second = split_folder(tmp_path / "one"), tmp_path / "two"
    make_image_folder(second / "train", per_class=4, classes=("ant", "bee", "cow"))
    make_image_folder(second / "test", per_class=2, classes=("ant", "bee", "cow"))

    def get_teacher(data):
        script, data_args, model_args, teacher_args, config = distill.parse_arguments(
            ["--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), *TINY])
        distill.get_teacher(config, model_args, teacher_args, data_args, load_image_splits(data_args))

    for data in (first, first, second):
        get_teacher(data)
    assert trained == [str(first), str(second)]  # the second call used the cache; other data retrained it
    Image.new("RGB", (10, 8), (9, 9, 9)).save(second / "train" / "bee" / "0.png")  # the same folder, other contents
    get_teacher(second)
    assert trained == [str(first), str(second), str(second)]


def test_model_sources_that_cannot_load_are_named_with_the_fix(tmp_path, monkeypatch):
    from srm_hf import loading
    from srm_hf.checkpoint import save_student

    save_student(timm_resnet(), str(tmp_path / "timm"))
    with pytest.raises(ValueError, match="is a file: give the folder that holds it"):
        load_image_classifier(str(tmp_path / "timm" / "config.json"))
    save_student(torch.nn.Linear(2, 2), str(tmp_path / "plain"))  # weights alone: no library knows the module
    with pytest.raises(ValueError, match="holds no config.json.*load_state_dict"):
        load_image_classifier(str(tmp_path / "plain"))
    monkeypatch.setattr(loading, "is_offline", lambda: True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No folder 'outputs/run' \(nor, offline, a Hub id in the cache\)"):
        load_image_classifier("outputs/run")  # a relative folder mistyped, not sent to the Hub
    for name in ("timm/resnet10t.not_cached", "hf-hub:timm/resnet10t.not_cached"):  # before the data is read
        with pytest.raises(FileNotFoundError, match=f"No folder '{name}' \\(nor, offline, a Hub id in the cache\\)"):
            loading.check_model_source(name)
    with pytest.raises(OSError, match="build it from scratch with pretrained=False"):
        load_image_classifier("timm:resnet10t")  # pretrained weights, and no network
    model = load_image_classifier("timm:resnet10t", num_labels=12, id2label={str(i): f"c{i}" for i in range(12)},
                                  pretrained=False)  # string keys, as a config.json gives them
    assert model.pretrained_cfg["label_names"][:3] == ["c0", "c1", "c2"]


def test_missing_and_corrupt_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No folder 'no/such/teacher'"):
        load_image_classifier("no/such/teacher")
    from srm_hf.checkpoint import save_student

    save_student(timm_resnet(), str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=f"weights of '{tmp_path / 'm'}' cannot be read.*corrupt"):
        load_image_classifier(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m/config\.json is not valid JSON"):
        load_image_classifier(str(tmp_path / "m"))


def test_yaml_values_of_the_wrong_type_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 2.5\n")
    parser = SRMParser((DataArguments, distill.DistillationConfig))
    with pytest.raises(ValueError, match=r"max_steps: 2\.5 in .*c\.yaml is not a valid int"):
        parser.parse(["--config", str(cfg)])
    cfg.write_text("learning_rate: 1\nmax_steps: '3'\n")  # an int for a float, a string argparse converts
    assert parser.parse(["--config", str(cfg)])[1].max_steps == 3


def test_saved_files_get_the_usual_mode(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, srm_dictionary_max_steps=1, srm_max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "method_state.safetensors", "config.json"):
        assert os.stat(tmp_path / "saved" / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_checkpoint_for_another_teacher_is_refused_naming_it(tmp_path):
    first = make_trainer(tmp_path, save_strategy="steps", save_steps=6)
    first.train()
    other = make_trainer(tmp_path / "other", teacher=timm_resnet(seed=3), student=hf_resnet())
    with pytest.raises(ValueError, match="another configuration.*teacher: 'ResNet, .* there, 'ResNet, .* here"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    smaller = make_trainer(tmp_path / "smaller", train_dataset=PatternDataset(24))
    with pytest.raises(ValueError, match="train_examples: 32 there, 24 here"):
        smaller.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))


def test_a_yaml_env_block_sets_environment_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("SRM_HF_TEST_VARIABLE", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("env:\n  SRM_HF_TEST_VARIABLE: 3\nmax_steps: 4\n")
    parser = SRMParser((DataArguments, distill.DistillationConfig))
    assert parser.parse(["--config", str(cfg)])[1].max_steps == 4
    assert os.environ.pop("SRM_HF_TEST_VARIABLE") == "3"
    cfg.write_text("env: [A]\n")
    with pytest.raises(ValueError, match="`env` in .* must be a mapping"):
        parser.parse(["--config", str(cfg)])


def test_a_last_batch_of_one_is_fine_where_batchnorm_sees_a_map(tmp_path):
    import torch.nn as nn

    torch_net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 4))
    assert preflight.norms_on_one_value(torch_net, PatternDataset(2).images) == []
    trainer = make_trainer(tmp_path, method="kd", student=torch_net, train_dataset=PatternDataset(17), max_steps=3)
    trainer.train()  # batches of 8, 8, 1: the BatchNorm sees 32×32 values per channel even in the batch of one
    assert trainer.state.global_step == 3


def test_image_folder_layouts_the_loader_reads_are_not_refused(tmp_path):
    make_image_folder(tmp_path / "nested" / "images")  # dir/images/<class>/: the loader labels by the parent folder
    from srm_hf.data import check_image_folder

    check_image_folder(str(tmp_path / "nested"))
    make_image_folder(tmp_path / "junk")
    (tmp_path / "junk" / "yak").mkdir()
    (tmp_path / "junk" / "yak" / ".DS_Store").write_text("x")  # only a hidden file: an empty class
    with pytest.raises(ValueError, match="yak'\\] hold no images"):
        check_image_folder(str(tmp_path / "junk"))
    (tmp_path / "junk" / "yak" / "notes.txt").write_text("x")  # a file the loader skips: still no image
    with pytest.raises(ValueError, match="yak'\\] hold no images"):
        check_image_folder(str(tmp_path / "junk"))
    (tmp_path / "junk" / "yak" / "notes.txt").unlink()
    (tmp_path / "junk" / "yak" / ".DS_Store").unlink()
    (tmp_path / "junk" / "yak").rmdir()
    (tmp_path / "junk" / "__MACOSX").mkdir()  # ignored, as the loader ignores it
    check_image_folder(str(tmp_path / "junk"))


def test_label_names_compare_up_to_spacing_and_order_numerically(tmp_path):
    from srm_hf.loading import label_names_of

    model = timm.create_model("resnet10t", num_classes=12, pretrained=False)
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": {str(i): f"c{i}" for i in range(12)}}
    assert label_names_of(model) == [f"c{i}" for i in range(12)]  # "10" after "9", not after "1"
    assert distill.same_label("T - shirt / top") == distill.same_label("T-shirt/top")


def test_a_yaml_choice_read_as_a_boolean_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("save_strategy: no\n")  # YAML reads a bare no as False
    with pytest.raises(ValueError, match="save_strategy: False .* is not one of .*quote it"):
        SRMParser((DataArguments, distill.DistillationConfig)).parse(["--config", str(cfg)])
    cfg.write_text("save_strategy: 'no'\n")
    assert SRMParser((DataArguments, distill.DistillationConfig)).parse(["--config", str(cfg)])[1].save_strategy == "no"


class TupleSamples(PatternDataset):  # as torchvision datasets give them
    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class PILSamples(PatternDataset):
    def __getitem__(self, i):
        return {"image": Image.new("RGB", (32, 32)), "labels": int(self.labels[i])}


@pytest.mark.parametrize("dataset, match", [
    (TupleSamples(8), r"sample 0 is a tuple \(torchvision datasets give \(image, label\) tuples\).*__getitem__"),
    (PILSamples(8), r"Sample 0 holds PIL images under \['image'\].*Transform the images first"),
])
def test_samples_the_collator_cannot_batch_are_named_before_it_runs(tmp_path, dataset, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, train_dataset=dataset, method="kd")


def test_a_collator_of_the_users_own_batches_tuples_and_stays_reachable(tmp_path):
    from srm_hf import DistillationTrainer

    class TupleCollator:
        note = "the user's"

        def __call__(self, rows):
            return {"pixel_values": torch.stack([x for x, _ in rows]), "labels": torch.tensor([y for _, y in rows])}

    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), data_collator=TupleCollator(),
                                  train_dataset=TupleSamples(16), args=make_config(tmp_path, method="kd", max_steps=2))
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.data_collator.note == "the user's"
    # -100, cross-entropy's ignore index, passes the batch check: the evaluation loss skips those rows
    unlabelled = relabelled(16, torch.where(torch.arange(16) % 2 == 0, torch.arange(16) % 4, -100))
    trainer = DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), train_dataset=PatternDataset(16),
                                  args=make_config(tmp_path, method="kd"))
    assert math.isfinite(trainer.predict(unlabelled).metrics["test_loss"])


@pytest.mark.parametrize("method", ["alone", "kd", "dkd"])
def test_images_labelled_minus_100_train_no_label_term(tmp_path, method):
    """-100, cross-entropy's ignore index, in the first sample and further in: the label terms are means over the
    labelled images (DKD's too), and a batch with none labelled gives them 0, not NaN."""
    labels = torch.where(torch.arange(16) % 3 == 0, -100, torch.arange(16) % 4)  # samples 0, 3, ... and batch [12,15]
    labels[12:16] = -100  # one whole batch of 4 unlabelled
    trainer = make_trainer(tmp_path, train_dataset=relabelled(16, labels), method=method, max_steps=4,
                           per_device_train_batch_size=4, logging_steps=1, max_nonfinite_steps=0)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 4 and all(math.isfinite(e["loss"]) for e in logged)


def test_an_evaluation_batch_with_no_labelled_image_is_left_out_of_the_loss(tmp_path):
    """In evaluation a batch of -100 labels gives NaN, as the student's own loss (torch's mean) gives it in the plain
    Trainer, so `eval_loss` is the plain Trainer's: where its evaluation loop drops non-finite batch losses (newer
    transformers), the mean over the labelled images, not lowered by a 0 for that batch; elsewhere NaN, as there."""
    from transformers import Trainer, TrainingArguments

    from srm_hf.losses import classification_loss

    trainer = make_trainer(tmp_path, method="kd", per_device_eval_batch_size=4)
    dataset = relabelled(8, torch.tensor([0, 1, 2, 3, -100, -100, -100, -100]))
    loss = trainer.evaluate(dataset)["eval_loss"]
    student = trainer.distill_model.student
    plain = Trainer(model=student, args=TrainingArguments(tmp_path / "plain", per_device_eval_batch_size=4,
                                                          use_cpu=True, report_to=[]))
    want = plain.evaluate(dataset)["eval_loss"]
    assert loss == pytest.approx(want, rel=1e-5, nan_ok=True)
    if math.isfinite(want):
        with torch.no_grad():
            logits = student.eval()(pixel_values=dataset.images).logits
        assert loss == pytest.approx(classification_loss(logits, dataset.labels).item(), rel=1e-5)


def test_a_teacher_and_student_naming_their_classes_in_another_order_are_refused(tmp_path, caplog):
    names = ["ant", "bee", "cow", "dog"]
    teacher = hf_resnet()
    teacher.config.id2label = dict(enumerate(names))
    student = hf_resnet(seed=1)
    student.config.id2label = dict(enumerate(reversed(names)))
    with pytest.raises(ValueError, match=r"same classes in another order \(class 0 is 'ant' for the teacher and "
                                         r"'dog' for the student\).*id2label"):
        make_trainer(tmp_path, teacher=teacher, student=student, method="kd")
    student.config.id2label = {i: f"n0{i}" for i in range(4)}  # another naming: matched by index, with a warning
    caplog.set_level(logging.WARNING)
    make_trainer(tmp_path, teacher=teacher, student=student, method="kd")
    assert any("class names differ" in r.message and "'n00'" in r.message for r in caplog.records)
    student.config.id2label = {i: f" {n.upper()}" for i, n in enumerate(names)}  # the same up to spacing and case
    caplog.clear()
    make_trainer(tmp_path, teacher=teacher, student=student, method="kd")
    assert not any("class names differ" in r.message for r in caplog.records)


class OtherKeys(PatternDataset):
    def __init__(self, n, key, value=None):
        super().__init__(n)
        self.key, self.value = key, value

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], self.key: self.value or int(self.labels[i])}


def test_batches_without_labels_say_why_and_labels_the_collator_drops_are_refused(tmp_path, caplog):
    trainer = make_trainer(tmp_path, train_dataset=OtherKeys(16, "labels", "cat"), method="kd", max_steps=1)
    with pytest.raises(ValueError, match=r"samples' 'labels' \('cat'\) did not reach the batches.*int indices"):
        trainer.train()
    assert trainer.state.global_step == 0
    caplog.set_level(logging.WARNING)
    trainer = make_trainer(tmp_path, train_dataset=OtherKeys(16, "fine_label"), method="kd", max_steps=1)
    trainer.train()  # distillation from the teacher alone: allowed, and said
    assert any("no 'labels'" in r.message and "['fine_label']: name the class labels 'labels'" in r.message
               for r in caplog.records)
