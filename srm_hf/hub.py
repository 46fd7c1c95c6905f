"""Model card and Hub upload of the student (and, separately, of a dictionary)."""

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from string import Template

from huggingface_hub import HfApi

CARD_TEMPLATE = os.path.join(os.path.dirname(__file__), "templates", "model_card.md")
# What a student folder may publish: its library's files and the card; never method state / training args.
STUDENT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")


def _versions() -> str:
    names = ("srm_hf", "torch", "timm", "transformers", "accelerate", "datasets")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def render_model_card(
    *,
    model_name: str,
    repo_id: str | None,
    library_name: str,
    teacher: str,
    teacher_revision: str | None,
    student: str,
    dataset: str,
    method: dict,
    seed: int,
    tap_pairs,
    stages: list[tuple[str, int]],
    metrics: dict[str, float],
) -> str:
    """The student's README.md: quick start, teacher, dataset, method settings, metrics, seed, versions, citation."""
    repo = repo_id or model_name
    if library_name == "timm":
        quickstart = f'import timm\nmodel = timm.create_model("hf-hub:{repo}", pretrained=True).eval()'
    else:
        quickstart = ("from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
                      f'model = AutoModelForImageClassification.from_pretrained("{repo}").eval()')
    metrics_table = "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()])
    taps = "\n".join(f"- `{p.teacher}` → `{p.student}`" for p in tap_pairs) or "- none (logits only)"
    settings = "\n".join(f"| {k} | {v} |" for k, v in method.items() if k != "name")
    model_index = ""
    if "test_accuracy" in metrics:
        model_index = (f"model-index:\n- name: {model_name}\n  results:\n  - task:\n      type: image-classification\n"
                       f"    dataset:\n      name: {dataset}\n      type: {dataset}\n    metrics:\n"
                       f"    - type: accuracy\n      value: {metrics['test_accuracy']:.4f}")
    teacher_link = teacher if os.path.isdir(teacher) else f"https://huggingface.co/{teacher.removeprefix('timm:')}"
    with open(CARD_TEMPLATE) as f:
        template = Template(f.read())
    return template.substitute(
        library_name=library_name, dataset=dataset, model_index=model_index, model_name=model_name,
        teacher=teacher, teacher_link=teacher_link, teacher_revision=teacher_revision or "local",
        student=student, quickstart=quickstart, metrics_table=metrics_table, method=method["name"],
        method_tag=method["name"].replace("_", "-"), stages=" → ".join(f"{n} ({steps} steps)" for n, steps in stages),
        settings=settings, seed=seed, taps=taps, versions=_versions(),
    )


def model_card_for(trainer, model_name: str | None = None, dataset: str | None = None, teacher: str | None = None,
                   teacher_revision: str | None = None, student: str | None = None,
                   metrics: dict[str, float] | None = None) -> str:
    """The model card of a `DistillationTrainer`'s student, with what the trainer knows filled in."""
    from .loading import library_of
    from .forward import unwrap_model

    distill_model, args = trainer.distill_model, trainer.args
    return render_model_card(
        model_name=model_name or Path(args.output_dir).absolute().name,
        repo_id=trainer.hub_model_id or args.hub_model_id,
        library_name=library_of(distill_model.student),
        teacher=teacher or args.teacher_model_name_or_path or type(unwrap_model(trainer.teacher)).__name__,
        teacher_revision=teacher_revision,
        student=student or type(distill_model.student).__name__,
        dataset=dataset or "custom",
        method=trainer.method.describe(),
        seed=args.seed,
        tap_pairs=trainer.tap_pairs,
        stages=[(s.name, s.steps) for s in trainer.plan.stages] if trainer.plan else [],
        metrics=metrics or {},
    )


def write_model_card(trainer, **kwargs) -> str:
    """`model_card_for(trainer, **kwargs)`, written to `output_dir/README.md` on the saving process."""
    card = model_card_for(trainer, **kwargs)
    if trainer.args.should_save:
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        with open(os.path.join(trainer.args.output_dir, "README.md"), "w") as f:
            f.write(card)
    return card


def push_student(trainer, commit_message: str | None = None, token: str | None = None, revision: str | None = None,
                 private: bool | None = None):
    """Upload only the student's files of the trainer's `output_dir` (see STUDENT_FILES) to its Hub model repo;
    arguments left None come from the trainer's `TrainingArguments` (hub_token, hub_revision, hub_private_repo)."""
    args = trainer.args
    folder, repo_id = args.output_dir, args.hub_model_id or trainer.hub_model_id
    token = token if token is not None else args.hub_token
    private = private if private is not None else args.hub_private_repo
    revision = revision if revision is not None else args.hub_revision
    commit_message = commit_message or "Upload distilled student"
    missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: save the student with trainer.save_model() first.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        for name in STUDENT_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copy2(os.path.join(folder, name), staging)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                 revision=revision)


def push_dictionary(path: str, repo_id: str, token: str | None = None, private: bool | None = None):
    """Upload a `srm_dictionary.safetensors` on its own, for reuse with `srm_dictionary_path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No dictionary at {path}: run trainer.train_stages(['dictionary']), then "
                                "trainer.method.save_dictionary(path).")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_file(path_or_fileobj=path, path_in_repo=os.path.basename(path), repo_id=repo_id,
                           commit_message="Upload SRM dictionary")
