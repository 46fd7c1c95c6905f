"""The recipes: parsing, an end-to-end run offline, the teacher cache, and the shipped configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import HANG_GUARD_S
from test_data import write_idx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import distill  # noqa: E402
import distill_resume  # noqa: E402
import train_teacher  # noqa: E402

from srm_hf import DistillationConfig  # noqa: E402
from srm_hf.methods import METHODS, resolve_method  # noqa: E402
from srm_hf.data import DEBIAN_FASHION_MNIST, DataArguments, load_image_splits  # noqa: E402

OFFLINE_CONFIGS = ["fashion_mnist.yaml"]
HUB_CONFIGS = ["cifar10.yaml", "cifar100.yaml", "food101.yaml", "beans.yaml"]
TINY = ["--train_teacher", "true", "--teacher_max_steps", "3", "--srm_dictionary_max_steps", "2", "--srm_max_steps", "2", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true"]


def test_flags_override_yaml_and_unknown_keys_fail(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("srm_mode: joint\nkd_alpha: 0.7\nlearning_rate: 0.01\nlayer_pairs: ['a:b']\n")
    _, _, _, _, config = distill.parse_arguments(["--config", str(cfg), "--kd_alpha", "0.3", "--use_cpu", "true"])
    assert (config.srm_mode, config.kd_alpha, config.learning_rate, config.layer_pairs) == ("joint", 0.3, 0.01, ["a:b"])
    cfg.write_text("srm_mode: joint\nkd_alpah: 0.7\n")
    with pytest.raises(ValueError, match="kd_alpah"):
        distill.parse_arguments(["--config", str(cfg)])
    with pytest.raises(ValueError, match="--not_a_flag"):
        distill.parse_arguments(["--not_a_flag", "1"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_from_the_recipe_with_its_own_defaults(tmp_path, method):
    """The recipe's SRM stage lengths and pixel CE are SRM's: another --method would refuse them as ignored settings."""
    script_args, *_, config = distill.parse_arguments(["--method", method, "--use_cpu", "true"])
    resolve_method(None, config)  # refuses settings of other methods
    assert script_args.compare == [m for m in ("kd", "alone") if m != method]  # not the main run twice
    if method in ("kd", "alone"):  # asked for: refused before the data is read
        script_args, _, model_args, _, config = distill.parse_arguments(["--method", method, "--compare", method,
                                                                         "--use_cpu", "true"])
        with pytest.raises(ValueError, match=f"--compare {method} names the main run's method"):
            distill.check_before_loading(script_args, model_args, config)
    defaults = DistillationConfig()
    for key, value in distill.SRM_RECIPE_DEFAULTS.items():
        assert getattr(config, key) == (value if method == "srm" else getattr(defaults, key)), key
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: {method}\nsrm_max_steps: 7\n")  # an SRM setting the user gives stays: refused unless srm
    if method == "srm":
        *_, config = distill.parse_arguments(["--config", str(cfg), "--use_cpu", "true"])
        assert (config.srm_max_steps, config.srm_dictionary_max_steps) == (7, 300)
    else:
        with pytest.raises(ValueError, match=f"srm_max_steps=7 is a setting of method srm.*'{method}'"):
            distill.parse_arguments(["--config", str(cfg), "--use_cpu", "true"])


@pytest.mark.parametrize("name", OFFLINE_CONFIGS + HUB_CONFIGS)
def test_shipped_configs_parse(name):
    distill.parse_arguments(["--config", str(ROOT / "recipes" / "configs" / name), "--use_cpu", "true", "--bf16", "false"])


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_a_hub_config_trains_the_epochs_it_names_on_every_image(name):
    """The recipe's own defaults (the offline run: 10 images per class, step counts) yield to what a config says."""
    _, data, _, _, config = distill.parse_arguments(["--config", str(ROOT / "recipes" / "configs" / name), "--use_cpu",
                                                     "true", "--bf16", "false"])
    assert data.max_train_samples_per_class is None
    assert (config.max_steps, config.srm_dictionary_max_steps, config.srm_max_steps) == (-1, -1, -1)
    assert (config.num_train_epochs, config.srm_dictionary_epochs, config.srm_epochs) == (20, 2, 5)


def test_an_epochs_flag_overrides_the_step_count_under_it_and_none_unsets_an_option(tmp_path):
    _, data, _, _, config = distill.parse_arguments(["--num_train_epochs", "3", "--use_cpu", "true"])
    assert (config.max_steps, config.num_train_epochs, config.srm_max_steps) == (-1, 3, 200)  # the others stay
    yaml = str(ROOT / "recipes/configs/fashion_mnist.yaml")
    _, data, _, _, config = distill.parse_arguments([f"--config={yaml}", "--srm_epochs", "2", "--use_cpu", "true",
                                                     "--max_train_samples_per_class", "none"])
    assert (config.srm_max_steps, config.srm_epochs, config.max_steps) == (-1, 2, 2200)
    assert data.max_train_samples_per_class is None
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: null\n")
    with pytest.raises(ValueError, match="max_steps: null in .*c.yaml, but max_steps needs a value"):
        distill.parse_arguments(["--config", str(cfg), "--use_cpu", "true"])
    with pytest.raises(SystemExit):  # argparse: "invalid int value"
        distill.parse_arguments(["--max_steps", "none", "--use_cpu", "true"])
    cfg.write_text("output_dir: 5\n")  # a number YAML read for a text option: the text
    assert distill.parse_arguments(["--config", str(cfg), "--use_cpu", "true"])[-1].output_dir == "5"
    with pytest.raises(ValueError, match="do_predict: the recipe always trains.*--test_split none"):
        distill.parse_arguments(["--do_predict", "false", "--use_cpu", "true"])


def test_default_yaml_matches_the_no_argument_run():
    defaults = distill.parse_arguments(["--use_cpu", "true"])
    from_yaml = distill.parse_arguments(["--config", str(ROOT / "recipes/configs/fashion_mnist.yaml"), "--use_cpu", "true"])
    for a, b in zip(defaults, from_yaml):
        for key, value in vars(a).items():
            if key.startswith("_") or key == "distributed_state":
                continue
            other = getattr(b, key)
            if key in ("student_model_kwargs", "teacher_model_kwargs", "teacher_architecture_kwargs"):
                value, other = json.loads(value), json.loads(other)
            assert value == other, key


def tiny_fashion_idx(root, classes: int = 4):
    """28x28 one-channel IDX data shaped like Fashion-MNIST (4 classes, 12 train / 4 test images each), labelled
    "0", "1", ... (Fashion-MNIST's names only in a folder named so)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 48), ("t10k", 16)):
        labels = np.arange(n) % classes
        images = rng.integers(0, 60, (n, 28, 28)) + (labels[:, None, None] * (200 // classes))
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(root)


def test_distill_end_to_end_offline_with_teacher_cache(tmp_path, monkeypatch, capsys):
    data = tiny_fashion_idx(tmp_path)
    out = tmp_path / "run"
    args = ["--dataset_dir", data, "--output_dir", str(out), *TINY]
    metrics = distill.main(args)
    assert "Tap pairs (teacher -> student" in capsys.readouterr().out  # the plan, before training
    assert set(metrics) == {"student_accuracy", "teacher_accuracy", "kd_student_accuracy", "alone_student_accuracy"}
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "method_state.safetensors", "README.md", "srm_report.png",
            "results.json"} <= files
    student = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert student.pretrained_cfg["input_size"] == (1, 28, 28) and student(torch.zeros(1, 1, 28, 28)).shape == (1, 4)
    results = json.loads((out / "results.json").read_text())
    assert results["train_images"] == 40 and results["test_images"] == 16  # the default 10 of the 11 per class left
    compute = results["equal_compute"]  # each compared run costs what the main run cost, in measured step times
    for name in ("kd", "alone"):
        per_step = compute["seconds_per_step"][f"{name}/{'ce' if name == 'alone' else name}"]
        assert abs(compute["steps"][name] * per_step - compute["main_run_seconds"]) <= per_step / 2 + 1e-9

    trained = []
    real_train_teacher = distill.train_teacher
    monkeypatch.setattr(distill, "train_teacher", lambda *a, **k: trained.append(1) or real_train_teacher(*a, **k))
    distill.main(args + ["--compare", "none", "--report", "false", "--test_split", "none"])
    assert trained == []  # cached teacher reused: the test split only reports
    capsys.readouterr()
    distill.main(args + ["--compare", "none", "--report", "false", "--teacher_max_steps", "4"])
    assert trained == [1]  # a changed teacher recipe retrains it, naming what changed
    assert "its ['teacher_args.teacher_max_steps'] differ" in capsys.readouterr().out


def test_selecting_the_best_checkpoint_on_accuracy_keeps_the_compared_runs_timing_probes_working(tmp_path):
    """The timing probes of `--compare` are trainers without compute_metrics: they must not inherit the selection
    (a trainer selecting on accuracy without compute_metrics is refused)."""
    out = tmp_path / "run"
    metrics = distill.main(["--dataset_dir", tiny_fashion_idx(tmp_path), "--output_dir", str(out), *TINY,
                            "--metric_for_best_model", "accuracy", "--save_strategy", "best", "--eval_strategy",
                            "steps", "--eval_steps", "1", "--report", "false"])
    assert {"student_accuracy", "kd_student_accuracy", "alone_student_accuracy"} <= set(metrics)


def test_only_the_main_student_reaches_the_hub_not_the_compared_runs(tmp_path, monkeypatch, fake_hub):
    """With --push_to_hub and a checkpoint push per save, the compared runs (KD, the student alone) and the timing
    probes train with the same settings: none of them may push into the main student's repo."""
    import distill_checks

    monkeypatch.setattr(distill_checks, "is_offline", lambda: False)
    distill.main(["--dataset_dir", tiny_fashion_idx(tmp_path), "--output_dir", str(tmp_path / "run"), *TINY,
                  "--push_to_hub", "true", "--hub_model_id", "someone/student", "--hub_strategy", "every_save",
                  "--save_strategy", "steps", "--save_steps", "2", "--report", "false"])
    messages = [c[1] for c in fake_hub["commits"]]
    assert messages[:-1] == [f"Training in progress, step {s}" for s in (2, 4, 6)]  # the main run's 6 steps only
    assert "Training in progress" not in messages[-1]  # then the student and its card, once


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_configs_fail_fast_offline(name, tmp_path):
    with pytest.raises(ConnectionError) as err:
        distill.main(["--config", str(ROOT / "recipes/configs" / name), "--max_steps", "5", "--use_cpu", "true",
                      "--bf16", "false", "--output_dir", str(tmp_path)])
    assert "--dataset_dir" in str(err.value) and "Could not load the Hub dataset" in str(err.value)


def test_accelerate_launch_reaches_training_on_fashion_mnist(tmp_path):
    assert os.path.isdir(DEBIAN_FASHION_MNIST), "install Debian's dataset-fashion-mnist (README test command)"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate_configs/cpu.yaml"), str(ROOT / "recipes/distill.py"),
           "--config", str(ROOT / "recipes/configs/fashion_mnist.yaml"), "--max_steps", "5",
           "--max_train_samples_per_class", "4", "--max_eval_samples", "64", "--compare", "none",
           "--output_dir", str(tmp_path), *TINY[:6]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "Fashion-MNIST" in results["data"] and results["test_images"] == 64
    assert "kd (5 steps)" in results["plan"]


def test_no_network_and_no_offline_flag_still_fails_fast(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "https://127.0.0.1:9"  # nothing listens there: the Hub is unreachable
    done = subprocess.run([sys.executable, str(ROOT / "recipes/distill.py"), "--config",
                           str(ROOT / "recipes/configs/beans.yaml"), "--max_steps", "5", "--use_cpu", "true",
                           "--bf16", "false", "--output_dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
    assert done.returncode != 0  # the unreachable Hub is detected, not waited on
    assert "unreachable: running offline" in done.stdout
    assert "Could not load the Hub dataset 'AI-Lab-Makerere/beans'" in done.stderr


@pytest.mark.parametrize("teacher, alone, message", [(None, False, "--teacher_model_name_or_path DIR"),
                                                     ("t", True, "--compare none"), ("t", False, None)])
def test_deepspeed_launch_asks_for_a_ready_teacher_and_one_trainer(monkeypatch, teacher, alone, message):
    # (parsing under ACCELERATE_USE_DEEPSPEED needs deepspeed installed, so the check is called directly)
    from types import SimpleNamespace

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    config, script = SimpleNamespace(teacher_model_name_or_path=teacher), SimpleNamespace(compare=["alone"] if alone else ["none"])
    if message is None:
        distill.check_engine(config, script)
    else:
        with pytest.raises(ValueError, match=message):
            distill.check_engine(config, script)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    distill.check_engine(SimpleNamespace(teacher_model_name_or_path=None), SimpleNamespace(compare=["alone"]))


def test_a_teacher_for_other_labels_is_refused_before_training(tmp_path):
    data = tiny_fashion_idx(tmp_path)  # 4 classes; the shipped teacher predicts 10
    with pytest.raises(ValueError, match="predicts 10 labels, the data has 4.*--train_teacher true"):
        distill.main(["--dataset_dir", data, "--output_dir", str(tmp_path / "run"), *TINY[2:]])
    (tmp_path / "digits").mkdir()
    ten = tiny_fashion_idx(tmp_path / "digits", classes=10)  # as many classes as the shipped teacher, other names
    with pytest.raises(ValueError, match=r"trained on the labels \['T-shirt/top'.*the data's are \['0', '1'"):
        distill.main(["--dataset_dir", ten, "--output_dir", str(tmp_path / "run"), *TINY[2:]])
    with pytest.raises(ValueError, match="not both"):
        distill.main(["--dataset_dir", data, "--output_dir", str(tmp_path / "run"), "--teacher_model_name_or_path",
                      str(ROOT / "recipes" / "teachers" / "fashion_mnist_resnet18"), *TINY])


def test_distill_resumes_from_a_checkpoint_at_its_step_and_stage(tmp_path):
    data = tiny_fashion_idx(tmp_path)
    args = ["--dataset_dir", data, *TINY, "--compare", "none", "--report", "false", "--save_strategy", "steps",
            "--save_steps", "3", "--eval_strategy", "no"]
    distill.main(args + ["--output_dir", str(tmp_path / "a")])
    first = json.loads((tmp_path / "a" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    # another seed: a run that ignored the checkpoint would log other losses for steps 1-3; the same teacher (a
    # teacher trained with seed 7 would be another one, and the checkpoint refused for it)
    i = args.index("--train_teacher")
    given = args[:i] + args[i + 2:]
    distill.main(given + ["--output_dir", str(tmp_path / "b"), "--seed", "7", "--teacher_model_name_or_path",
                          str(tmp_path / "a" / "teacher"),
                          "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-3")])
    resumed = json.loads((tmp_path / "b" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    losses = {e["step"]: (e["loss"], e["stage"]) for e in first if "loss" in e}
    again = {e["step"]: (e["loss"], e["stage"]) for e in resumed if "loss" in e}
    assert sorted(again) == list(range(1, 7))  # 2 dictionary + 2 SRM + 2 KD steps, none run twice
    assert all(again[s] == losses[s] for s in (1, 2, 3))  # restored from the checkpoint, not re-run
    assert [again[s][1] for s in range(4, 7)] == [2, 3, 3]  # it went on in stage 2 at step 4
    assert not (tmp_path / "b" / "checkpoint-3").exists()


def test_a_recipe_saved_transformers_student_works_with_pipeline(tmp_path):
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification, pipeline

    student = tmp_path / "student"
    # three channels: pipeline() loads every image as RGB (the recipe feeds the grayscale data as RGB too)
    ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=4, image_size=28)).save_pretrained(student)
    out = tmp_path / "run"
    distill.main(["--dataset_dir", tiny_fashion_idx(tmp_path), "--output_dir", str(out), *TINY, "--compare", "none",
                  "--report", "false", "--student_model_name_or_path", str(student), "--student_model_kwargs", "{}"])
    assert (out / "preprocessor_config.json").is_file()
    classify = pipeline("image-classification", model=str(out))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))  # any size
    predictions = classify(image)
    assert {p["label"] for p in predictions} <= {"0", "1", "2", "3"} and len(predictions) == 4


@pytest.mark.parametrize("value", ["1", "ON", "yes", "True", "0", "off", "no", "false", "", "2"])
def test_the_recipes_read_hf_hub_offline_as_huggingface_hub_does(value, monkeypatch):
    from huggingface_hub.constants import _is_true
    from offline import offline_requested

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert offline_requested() == _is_true(value)


@pytest.mark.parametrize("flags, error, match", [
    (["--compare", "nope"], ValueError, "--compare nope: no such method"),
    (["--compare", "srm"], ValueError, "one-stage methods"),
    (["--student_model_name_or_path", "timm:resnet_nope"], ValueError, "timm has no architecture 'resnet_nope'"),
    (["--student_model_name_or_path", "/no/such/student"], FileNotFoundError, "No folder --student_model_name_or_path"),
    (["--student_model_kwargs", "{bad"], ValueError, "student_model_kwargs: expected a JSON object"),
    (["--teacher_model_kwargs", "{bad"], ValueError, "teacher_model_kwargs: expected a JSON object"),
    (["--metrics", "no_such_metric_here"], ValueError, "metric 'no_such_metric_here' cannot be loaded"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-3"], ValueError, "no such folder"),
    (["--push_to_hub", "true", "--hub_model_id", "someone/student"], ValueError, "need the Hub.*offline"),
])
def test_bad_arguments_stop_the_recipe_before_the_data_or_a_teacher(tmp_path, flags, error, match):
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        distill.main(["--dataset_dir", str(tmp_path / "no_data_read"), "--output_dir", str(out), *TINY, *flags])
    assert not (out / "teacher").exists()  # no teacher trained (the data folder is not even read)


def test_a_yaml_scalar_for_a_list_option_is_a_list_of_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("metrics: accuracy\ncompare: kd\nlayer_pairs: 'layer1:layer1'\n")
    script, _, _, _, config = distill.parse_arguments(["--config", str(cfg), "--use_cpu", "true"])
    assert (script.metrics, script.compare, config.layer_pairs) == (["accuracy"], ["kd"], ["layer1:layer1"])


def test_a_named_test_split_must_exist_and_sample_caps_be_positive(tmp_path):
    data = tiny_fashion_idx(tmp_path)
    with pytest.raises(ValueError, match="No split 'tset'.*--test_split"):
        load_image_splits(DataArguments(dataset_dir=data, test_split="tset"))
    for name in ("max_train_samples_per_class", "max_eval_samples"):
        with pytest.raises(ValueError, match=f"{name}=0 must be at least 1"):
            DataArguments(**{name: 0})


def test_a_saved_timm_student_works_with_pipeline_and_timm(tmp_path):
    from PIL import Image
    from transformers import pipeline

    from srm_hf.checkpoint import save_student
    from srm_hf.loading import load_image_classifier

    student = load_image_classifier("timm:resnet10t", num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"},
                                    pretrained=False, channels=[8, 16, 32, 64], stem_width=8)
    save_student(student, str(tmp_path))
    classify = pipeline("image-classification", model=str(tmp_path))  # failed on a second num_classes
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    assert {p["label"] for p in classify(image)} == {"cat", "dog", "owl"}
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert again.num_classes == 3 and all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                                            student.state_dict().values()))


def test_a_teacher_whose_last_batch_holds_one_image_is_refused_before_training(tmp_path):
    from transformers import TrainingArguments

    data = tiny_fashion_idx(tmp_path)
    size = len(load_image_splits(DataArguments(dataset_dir=data)).train) - 1  # the last batch: one image
    base = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=size, use_cpu=True,
                             report_to="none")
    kwargs = json.dumps({"in_chans": 1, "pretrained_cfg_overlay": train_teacher.FASHION_MNIST_INPUT})  # 28 px
    teacher = train_teacher.TeacherArguments(teacher_architecture="timm:resnet10t", teacher_max_steps=1,
                                             teacher_architecture_kwargs=kwargs)
    with pytest.raises(ValueError, match="last batch of every epoch holds one example.*nothing was trained"):
        train_teacher.train_teacher(teacher, DataArguments(dataset_dir=data), base, str(tmp_path / "teacher"))
    assert not (tmp_path / "teacher" / "teacher_recipe.json").exists()


def test_the_teacher_recipe_checks_every_image_it_trains_on_first(tmp_path):
    from PIL import Image
    from transformers import TrainingArguments

    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (28, 28), 40 * c + i).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "dog" / "5.png").write_bytes(b"not a png")  # outside any student's subset of one per class
    base = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    teacher = train_teacher.TeacherArguments(teacher_architecture="timm:resnet10t", teacher_max_steps=1)
    data = DataArguments(dataset_dir=str(tmp_path / "data"), max_train_samples_per_class=1)
    with pytest.raises(ValueError, match="5.png.*cannot be used.*nothing was trained") as refused:
        train_teacher.train_teacher(teacher, data, base, str(tmp_path / "teacher"))
    assert str(refused.value).count("Remove or replace") == 1  # the fix said once
    assert not (tmp_path / "teacher").exists()


def test_the_teacher_recipe_trains_in_the_distillation_runs_layout(tmp_path, monkeypatch):
    seen = []

    class Recording(train_teacher.Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            seen.append({p.is_contiguous(memory_format=torch.channels_last)
                         for p in model.parameters() if p.dim() == 4})
            return super().training_step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(train_teacher, "Trainer", Recording)
    data = tiny_fashion_idx(tmp_path)
    base = DistillationConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", channels_last=True)
    kwargs = json.dumps({"in_chans": 1, "pretrained_cfg_overlay": train_teacher.FASHION_MNIST_INPUT})  # 28 px
    teacher = train_teacher.TeacherArguments(teacher_architecture="timm:resnet10t", teacher_max_steps=1,
                                             teacher_architecture_kwargs=kwargs)
    folder = train_teacher.train_teacher(teacher, DataArguments(dataset_dir=data), base, str(tmp_path / "teacher"))
    assert seen == [{True}]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)  # written contiguous: loads as usual
    assert all(p.is_contiguous() for p in loaded.parameters())


def test_none_unsets_text_and_boolean_options_but_report_to_keeps_its_own_none():
    script_args, _, model_args, _, config = distill.parse_arguments(
        ["--use_cpu", "true", "--resume_from_checkpoint", "none", "--teacher_revision", "null", "--report_to", "none",
         "--ddp_find_unused_parameters", "none"])
    assert config.resume_from_checkpoint is None and model_args.teacher_revision is None
    assert config.report_to in ([], "none", ["none"]) and config.ddp_find_unused_parameters is True
    with pytest.raises(ValueError, match="Unknown command-line arguments \\['--num_train_epoch'"):
        distill.parse_arguments(["--num_train_epoch", "3", "--use_cpu", "true"])  # no abbreviations


def test_bare_mixed_precision_and_cpu_flags_mean_true_as_in_training_arguments(monkeypatch):
    """bf16 / fp16 / use_cpu are `bool | None` here (unset: the launch config decides), yet a bare flag still means
    true, in the recipe and in a user's HfArgumentParser, as TrainingArguments' own booleans do."""
    from transformers import HfArgumentParser

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    *_, config = distill.parse_arguments(["--use_cpu", "--bf16"])
    assert config.use_cpu is True and config.bf16 is True
    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(["--output_dir", "x", "--use_cpu"])
    assert cfg.use_cpu is True and cfg.bf16 is False
    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--use_cpu", "--bf16", "false"])
    assert cfg.use_cpu is True and cfg.bf16 is False


def test_a_recipe_killed_in_a_compared_run_resumes_it_and_retrains_nothing(tmp_path, monkeypatch):
    """Killed while the compared runs train (the main run's last checkpoint is at the end of its plan), the recipe
    resumed loads the finished students, resumes each compared run from its own newest complete checkpoint (or
    starts it afresh without one) for the lengths measured at the start, and ends as the uninterrupted run did."""
    from srm_hf.checkpoint import COMPLETE_NAME

    out = tmp_path / "run"
    args = ["--dataset_dir", tiny_fashion_idx(tmp_path), "--output_dir", str(out), *TINY, "--report", "false",
            "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no"]
    first = distill.main(args)
    steps = json.loads((out / "results.json").read_text())["equal_compute"]["steps"]
    assert (out / "checkpoint-6" / COMPLETE_NAME).is_file()  # the end of the main plan: 2 + 2 + 2 steps
    assert (out / "kd" / f"checkpoint-{steps['kd']}" / COMPLETE_NAME).is_file()  # kd finished
    kept = sorted(int(p.name.rsplit("-", 1)[1]) for p in (out / "alone").glob("checkpoint-*"))[0]
    for later in (out / "alone").glob("checkpoint-*"):  # killed in the run alone, after its first checkpoint
        if later.name != f"checkpoint-{kept}":
            (later / COMPLETE_NAME).unlink()
    (out / "results.json").unlink()

    trained = record_training(monkeypatch, out)

    def no_timing(*a, **k):
        raise AssertionError("the step times measured at the start are reused")

    monkeypatch.setattr(distill_resume, "stage_step_seconds", no_timing)
    again = distill.main(args + ["--resume_from_checkpoint", "true"])
    assert trained == [("alone", str(out / "alone" / f"checkpoint-{kept}"))]  # neither the main run nor kd again
    assert again == first
    assert json.loads((out / "results.json").read_text())["equal_compute"]["steps"] == steps

    trained.clear()
    for folder in (out / "alone").glob("checkpoint-*"):  # no checkpoint of its own: it starts afresh
        for name in os.listdir(folder):
            os.remove(folder / name)
        folder.rmdir()
    assert distill.main(args + ["--resume_from_checkpoint", "true"]) == first
    assert trained == [("alone", None)]
    # a main run shortened past its checkpoint cannot go on: refused before the step times and any training
    monkeypatch.setattr(distill, "step_seconds", no_timing)
    with pytest.raises(ValueError, match="checkpoint-6 is at step 6, the end of this run's plan.*nothing is left"):
        distill.main(args + ["--resume_from_checkpoint", "true", "--max_steps", "1"])
    assert trained == [("alone", None)]


def test_a_resumed_recipe_passes_over_compared_checkpoints_of_an_earlier_run_in_its_folder(tmp_path, monkeypatch):
    """A second run in the same output_dir, killed once its main run ended: resumed, it loads its own main student,
    and its compared run starts afresh rather than going on from (or loading) the first run's checkpoints, which
    were trained to another length."""
    out = tmp_path / "run"
    args = ["--dataset_dir", tiny_fashion_idx(tmp_path), "--output_dir", str(out), *TINY, "--report", "false",
            "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no", "--compare", "kd"]
    distill.main(args)
    earlier = sorted((out / "kd").glob("checkpoint-*"))
    assert earlier

    def killed(*a, **k):
        raise RuntimeError("killed after the main run")

    monkeypatch.setattr(distill, "train_compared", killed)
    with pytest.raises(RuntimeError, match="killed"):
        distill.main(args)  # a new series: the step times are measured again
    monkeypatch.undo()
    trained = record_training(monkeypatch, out)
    distill.main(args + ["--resume_from_checkpoint", "true"])
    assert trained == [("kd", None)]  # the main student loaded; kd afresh, not from the first run's checkpoints


def test_a_recipe_saving_only_models_resumes_by_loading_finished_students_and_retraining_the_rest(tmp_path,
                                                                                                   monkeypatch):
    """With save_only_model, a checkpoint at the end of a run's plan holds its student, which a resumed recipe
    loads; a compared run's earlier checkpoint holds nothing to resume from: that run starts afresh. A main-run
    checkpoint in the middle of its plan is refused before the data or the teacher is loaded."""
    from srm_hf.checkpoint import COMPLETE_NAME

    out = tmp_path / "run"
    args = ["--dataset_dir", tiny_fashion_idx(tmp_path), "--output_dir", str(out), *TINY, "--report", "false",
            "--save_strategy", "steps", "--save_steps", "2", "--save_only_model", "true", "--eval_strategy", "no",
            "--compare", "kd"]
    first = distill.main(args)
    kd = sorted((out / "kd").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    assert len(kd) > 1
    (kd[-1] / COMPLETE_NAME).unlink()  # killed in kd, after an earlier checkpoint
    trained = record_training(monkeypatch, out)
    assert distill.main(args + ["--resume_from_checkpoint", "true"]) == first
    assert trained == [("kd", None)]  # the main student loaded; kd afresh, for the lengths measured at the start

    def no_data(*a, **k):
        raise AssertionError("refused before the data is read")

    monkeypatch.setattr(distill, "load_image_splits", no_data)
    with pytest.raises(ValueError, match="checkpoint-2 was saved with save_only_model=True.*start a new run"):
        distill.main(args + ["--resume_from_checkpoint", str(out / "checkpoint-2")])


def record_training(monkeypatch, out) -> list:
    """The (output_dir relative to `out`, resume_from_checkpoint) of every `train()` from now on."""
    trained = []
    real_train = distill.DistillationTrainer.train

    def train(self, resume_from_checkpoint=None, *a, **k):
        trained.append((os.path.relpath(self.args.output_dir, out), resume_from_checkpoint))
        return real_train(self, resume_from_checkpoint, *a, **k)

    monkeypatch.setattr(distill.DistillationTrainer, "train", train)
    return trained
