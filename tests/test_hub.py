"""Model card content and the push round trip (network calls of HfApi patched, everything else real)."""

from concurrent.futures import Future

import pytest
import timm
import torch
from conftest import hf_resnet, make_trainer, timm_resnet
from huggingface_hub import HfApi, ModelCard
from transformers import TrainerCallback
from transformers import AutoModelForImageClassification


def logits_of(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def trained(tmp_path, **kwargs):
    trainer = make_trainer(tmp_path, srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=1, **kwargs)
    trainer.train()
    return trainer


def test_push_transformers_student_round_trip(tmp_path, fake_hub):
    trainer = trained(tmp_path, push_to_hub=True, hub_model_id="someone/student-srm")
    trainer.push_to_hub(dataset="pattern-data", teacher="someone/teacher", teacher_revision="abc123")
    remote = fake_hub["someone/student-srm"]
    files = {p.name for p in remote.iterdir()}
    assert files == {"config.json", "model.safetensors", "README.md"}  # the student only: no SRM state, no args
    x = torch.randn(2, 3, 32, 32)
    reloaded = AutoModelForImageClassification.from_pretrained(remote)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(trainer.distill_model.student, x))
    card = (remote / "README.md").read_text()
    # no image processor was given, so none was saved: the card loads the model without pipeline()
    assert 'AutoModelForImageClassification.from_pretrained("someone/student-srm")' in card and "pipeline(" not in card
    assert "someone/teacher" in card and "abc123" in card and "pattern-data" in card


def test_push_timm_student_round_trip_and_dictionary(tmp_path, fake_hub):
    from srm_hf.hub import push_dictionary

    trainer = trained(tmp_path, teacher=hf_resnet(hidden_sizes=(16, 32, 48, 64)), student=timm_resnet(),
                      hub_model_id="someone/timm-student")
    trainer.push_to_hub()
    remote = fake_hub["someone/timm-student"]
    reloaded = timm.create_model(f"local-dir:{remote}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(trainer.distill_model.student, x))
    assert 'timm.create_model("hf-hub:someone/timm-student", pretrained=True)' in (remote / "README.md").read_text()
    push_dictionary(trainer.method.save_dictionary(str(tmp_path / "srm_dictionary.safetensors")), "someone/srm-dictionary")
    assert (fake_hub["someone/srm-dictionary"] / "srm_dictionary.safetensors").is_file()


def test_model_card_content(tmp_path):
    trainer = trained(tmp_path, srm_mode="joint", srm_codeword_multiplier=1.5, srm_sparsity_multiplier=0.03, seed=7)
    card = trainer.create_model_card(model_name="tiny-student", dataset="uoft-cs/cifar10", teacher="timm/resnet50",
                                     teacher_revision="v1", student="timm:resnet18",
                                     metrics={"test_accuracy": 0.8125})
    assert card == (tmp_path / "out" / "README.md").read_text()
    for text in ("# tiny-student", "uoft-cs/cifar10", "`timm/resnet50` (revision `v1`)", "`timm:resnet18`",
                 "| method | `srm` |", "| mode | joint |", "dictionary (1 steps) → joint (1 steps)", "| m | 1.5 |",
                 "| s | 0.03 |", "| seed | 7 |", "| test_accuracy | 0.8125 |", "value: 0.8125",
                 "`layer1: 32x8x8 (reduction 4)` → `resnet.encoder.stages.0: 8x8x8 (reduction 4)`",
                 "'layer1': [48, 1]", "torch ", "transformers ", "timm ", "arXiv:2103.17012", "library_name: transformers"):
        assert text in card, text


def test_the_card_lists_results_not_run_statistics_and_cites_the_methods_paper():
    from srm_hf.hub import render_model_card
    from srm_hf.methods import METHODS

    metrics = {"eval_accuracy": 0.5, "eval_loss": 1.25, "eval_runtime": 3.0, "eval_samples_per_second": 9.0,
               "eval_steps_per_second": 1.0, "stage": 1.0, "epoch": 2.0}
    common = dict(model_name="s", repo_id=None, library_name="timm", teacher="t", teacher_revision=None,
                  student="timm:resnet10t", dataset="custom", seed=0, tap_pairs=[], stages=[("kd", 2)],
                  metrics=metrics)
    card = render_model_card(method={"name": "kd"}, citation=METHODS["kd"].citation, **common)
    assert "| eval_accuracy | 0.5000 |" in card and "| eval_loss | 1.2500 |" in card
    assert not any(f"| {k} |" in card for k in ("eval_runtime", "eval_samples_per_second", "stage", "epoch"))
    assert "arXiv:1503.02531" in card and "2103.17012" not in card  # KD's paper, not SRM's
    assert "## Citation" not in render_model_card(method={"name": "alone"}, **common)  # no paper: no section


def test_the_card_of_a_timm_student_saved_here_loads_it_from_its_folder():
    from srm_hf.hub import render_model_card

    card = render_model_card(model_name="student-srm", repo_id=None, library_name="timm", teacher="teacher",
                             teacher_revision=None, student="timm:resnet10t", dataset="custom", method={"name": "kd"},
                             seed=0, tap_pairs=[], stages=[("kd", 4)], metrics={})
    assert 'timm.create_model("local-dir:student-srm", pretrained=True)' in card and "hf-hub:" not in card


@pytest.mark.parametrize("library, has_processor, repo_id, lines", [
    ("transformers", True, "someone/s", ['classify = pipeline("image-classification", model="someone/s")']),
    ("transformers", False, "someone/s", ['AutoModelForImageClassification.from_pretrained("someone/s")']),
    ("pytorch", True, "someone/s", ['hf_hub_download("someone/s", "model.safetensors")', "model = TinyNet()"]),
    ("pytorch", True, None, ['load_file("student-srm/model.safetensors")']),
])
def test_the_cards_quick_start_loads_what_was_saved(library, has_processor, repo_id, lines):
    from srm_hf.hub import render_model_card

    card = render_model_card(model_name="student-srm", repo_id=repo_id, library_name=library, teacher="teacher",
                             teacher_revision=None, student="TinyNet", dataset="custom", method={"name": "kd"},
                             seed=0, tap_pairs=[], stages=[("kd", 4)], metrics={}, has_processor=has_processor)
    assert all(line in card for line in lines), card


def test_the_card_lists_the_stages_run_alone_before(tmp_path):
    trainer = make_trainer(tmp_path, srm_dictionary_max_steps=2, srm_max_steps=1, max_steps=1)
    trainer.train_stages(["dictionary"])
    trainer.train()
    assert "dictionary (2 steps) → srm (1 steps) → kd (1 steps)" in trainer.create_model_card()


def test_push_needs_a_saved_student(tmp_path):
    from srm_hf.hub import push_student

    from types import SimpleNamespace

    args = SimpleNamespace(output_dir=str(tmp_path), hub_model_id="someone/nothing", hub_token=None,
                           hub_private_repo=None, hub_revision=None)
    with pytest.raises(FileNotFoundError, match="save_model"):
        push_student(SimpleNamespace(args=args, hub_model_id=None, distill_model=SimpleNamespace(student=hf_resnet())))


def test_push_to_hub_takes_the_trainer_card_arguments_and_writes_hub_metadata(tmp_path, fake_hub):
    trainer = trained(tmp_path, hub_model_id="someone/student")
    trainer.push_to_hub(tags=["fashion"], license="apache-2.0", language="en", dataset=str(tmp_path),
                        dataset_tags="zalando-datasets/fashion_mnist", teacher="hf-hub:someone/teacher",
                        metrics={"test_accuracy": 0.75, "test_teacher_accuracy": 0.9})
    card_text = (fake_hub["someone/student"] / "README.md").read_text()
    data = ModelCard.load(fake_hub["someone/student"] / "README.md").data
    assert data.license == "apache-2.0" and data.language == "en" and "fashion" in data.tags
    assert data.pipeline_tag == "image-classification" and data.library_name == "transformers"
    assert data.base_model == "someone/teacher" and data.datasets == ["zalando-datasets/fashion_mnist"]
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results] == [("accuracy", 0.75, "test")]
    assert str(tmp_path) not in card_text  # a local path never reaches the Hub
    assert [c[1] for c in fake_hub["commits"]] == ["End of training"]  # one commit


def test_a_local_teacher_and_dataset_give_no_hub_links(tmp_path):
    trainer = trained(tmp_path)
    card = trainer.create_model_card(teacher=str(tmp_path), dataset=str(tmp_path), metrics={"test_accuracy": 0.5})
    data = ModelCard(card).data
    assert data.base_model is None and data.datasets is None and str(tmp_path) not in card
    assert "https://huggingface.co/" not in card


def test_push_without_blocking_returns_the_upload_future_and_fires_on_push_begin(tmp_path, fake_hub):
    pushes = []

    class Count(TrainerCallback):
        def on_push_begin(self, args, state, control, **kwargs):
            pushes.append(state.global_step)

    trainer = trained(tmp_path, hub_model_id="someone/student", callbacks=[Count()])
    future = trainer.push_to_hub(blocking=False)
    assert isinstance(future, Future) and future.result() == "commit"
    assert pushes == [3]


def test_hub_strategy_every_save_pushes_each_checkpoint_student_in_the_background(tmp_path, fake_hub):
    trainer = trained(tmp_path, push_to_hub=True, hub_model_id="someone/student", hub_strategy="every_save",
                      save_strategy="steps", save_steps=1)
    trainer._finish_current_push()
    commits = fake_hub["commits"]
    assert [c[1] for c in commits] == [f"Training in progress, step {s}" for s in (1, 2, 3)]
    assert all(c[2] == ["config.json", "model.safetensors"] for c in commits)  # no method state, no optimizer


def test_a_plain_module_student_is_pushed_as_weights_with_a_card_that_loads_them(tmp_path, fake_hub):
    import torch.nn as nn

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    trainer = make_trainer(tmp_path, student=plain, method="kd", max_steps=1, hub_model_id="someone/plain")
    trainer.train()
    trainer.push_to_hub()
    remote = fake_hub["someone/plain"]
    assert {p.name for p in remote.iterdir()} == {"model.safetensors", "README.md"}
    assert 'hf_hub_download("someone/plain", "model.safetensors")' in (remote / "README.md").read_text()


def test_push_to_hub_without_the_hub_stops_when_the_trainer_is_built(tmp_path):
    """As the Trainer does: offline (the tests' HF_HUB_OFFLINE=1), the repo cannot be created, so the run stops
    before training instead of at its first save."""
    with pytest.raises(RuntimeError, match="repo 'someone/student' cannot be created.*push_to_hub=False"):
        make_trainer(tmp_path, push_to_hub=True, hub_model_id="someone/student")


def test_a_checkpoint_push_that_fails_leaves_training_and_the_checkpoint_whole(tmp_path, fake_hub, monkeypatch):
    from srm_hf.resume import read_marker

    trainer = make_trainer(tmp_path, method="kd", max_steps=2, push_to_hub=True, hub_model_id="someone/student",
                           hub_strategy="every_save", save_strategy="steps", save_steps=1)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("the network is down")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(read_marker(str(tmp_path / "out" / f"checkpoint-{s}")) for s in (1, 2))  # complete: resumable
