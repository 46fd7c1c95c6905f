"""The student on the Hub: its model card (metadata through `huggingface_hub.ModelCardData`) and its upload.

`HubMixin` gives `DistillationTrainer` the Trainer's Hub methods for the student alone: `push_to_hub(**kwargs)`
takes what `Trainer.create_model_card` takes (tags, license, finetuned_from, dataset_tags, language, ...) and the
card's own fields (teacher, metrics, ...); `blocking=False` returns the upload's future; `hub_strategy="every_save"`
pushes each checkpoint's student in the background ("checkpoint" and "all_checkpoints", which promise resumable
checkpoints on the Hub, are refused: `srm_hf.trainer_options`). Method state, optimizer files and training arguments
are never published.
"""

import os
import re
import shutil
import tempfile
from importlib import metadata
from string import Template

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers.utils import logging

CARD_TEMPLATE = os.path.join(os.path.dirname(__file__), "templates", "model_card.md")
# What a student folder may publish: its library's files and the card; never method state / training args.
STUDENT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
logger = logging.get_logger(__name__)


def _versions() -> str:
    found = []
    for name in ("srm_hf", "torch", "timm", "transformers", "accelerate", "datasets"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def hub_id(name: str | None) -> str | None:
    """The Hub repo id a model or dataset name refers to (`hf-hub:` stripped), or None for a local path, a timm
    architecture built from scratch (`timm:<arch>`) or anything else that is not `owner/name`."""
    if not name or name.startswith("timm:") or os.path.exists(name):
        return None
    name = name.removeprefix("hf-hub:")
    return name if HUB_ID.fullmatch(name) else None


def _shown(name: str) -> str:
    """A name as the card may show it: Hub ids as they are, local paths by their last part only."""
    return name if hub_id(name) or not os.path.exists(name) else os.path.basename(os.path.normpath(name))


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


RUN_STATISTICS = ("_runtime", "_samples_per_second", "_steps_per_second")  # of an evaluation, not results

def render_model_card(*, model_name: str, repo_id: str | None, library_name: str, teacher: str,
                      teacher_revision: str | None, student: str, dataset: str, method: dict, seed: int, tap_pairs,
                      stages: list[tuple[str, int]], metrics: dict[str, float], language=None, license=None,
                      tags=None, finetuned_from=None, tasks=None, dataset_tags=None, dataset_args=None,
                      has_processor: bool = True, citation: str = "") -> str:
    """The student's README.md: Hub metadata (library, pipeline tag, base model, Hub datasets, license, tags,
    model-index of the test metrics), then quick start, teacher, dataset, method settings, metrics (not the runtimes
    nor the stage and epoch an evaluation logs), seed, versions, the method's citation (BibTeX)."""
    datasets = [d for d in (_as_list(dataset_tags) or [dataset]) if hub_id(d)]
    task = (_as_list(tasks) or ["image-classification"])[0]
    results = [EvalResult(task_type=task, dataset_type=datasets[0] if datasets else "imagefolder",
                          dataset_name=_shown(dataset), dataset_split="test", metric_type=k.removeprefix("test_"),
                          metric_value=round(float(v), 6), dataset_args=_as_list(dataset_args) or None)
               for k, v in metrics.items() if k.startswith("test_") and k.removeprefix("test_") in ("accuracy", "f1",
                                                                                                    "precision",
                                                                                                    "recall")]
    data = ModelCardData(
        library_name=library_name, pipeline_tag="image-classification", license=license, language=language,
        base_model=finetuned_from or hub_id(teacher), datasets=datasets or None,
        tags=list(dict.fromkeys(["image-classification", "knowledge-distillation", "srm_hf",
                                 method["name"].replace("_", "-"), *_as_list(tags)])),
        metrics=sorted({r.metric_type for r in results}) or None, model_name=model_name if results else None,
        eval_results=results or None)
    repo = repo_id or model_name
    if library_name == "timm":
        source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{model_name}"  # a folder saved here, not pushed
        quickstart = f'import timm\nmodel = timm.create_model("{source}", pretrained=True).eval()'
    elif library_name == "pytorch":  # weights alone: the code that builds the architecture is the user's
        path = f'hf_hub_download("{repo_id}", "model.safetensors")' if repo_id else f'"{model_name}/model.safetensors"'
        quickstart = (("from huggingface_hub import hf_hub_download\n" if repo_id else "") +
                      "from safetensors.torch import load_file\n"
                      f"model = {_shown(student)}()  # the student's architecture, built by its own code\n"
                      f"model.load_state_dict(load_file({path}))")
    elif not has_processor:  # no preprocessor_config.json: pipeline() could not prepare the images
        quickstart = ("from transformers import AutoModelForImageClassification\n"
                      f'model = AutoModelForImageClassification.from_pretrained("{repo}")  # no image processor '
                      "was saved: prepare the images as in training")
    else:
        quickstart = ('from transformers import pipeline\n'
                      f'classify = pipeline("image-classification", model="{repo}")')
    teacher_ref = f"[{hub_id(teacher)}](https://huggingface.co/{hub_id(teacher)})" if hub_id(teacher) else \
        f"`{_shown(teacher)}`"
    with open(CARD_TEMPLATE) as f:
        body = Template(f.read()).substitute(
            library_name=library_name, dataset=_shown(dataset), model_name=model_name, teacher=_shown(teacher),
            teacher_ref=teacher_ref, teacher_revision=teacher_revision or "local", student=_shown(student),
            quickstart=quickstart, method=method["name"],
            metrics_table="\n".join(["| metric | value |", "|---|---|"] +
                                    [f"| {k} | {v:.4f} |" for k, v in metrics.items()
                                     if not k.endswith(RUN_STATISTICS) and k not in ("stage", "epoch")]),
            stages=" → ".join(f"{n} ({steps} steps)" for n, steps in stages),
            settings="\n".join(f"| {k} | {v} |" for k, v in method.items() if k != "name"), seed=seed,
            taps="\n".join(f"- `{p.teacher}` → `{p.student}`" for p in tap_pairs) or "- none (logits only)",
            versions=_versions(),
            citation=f"## Citation\n\n```bibtex\n{citation}\n```\n" if citation else "")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def model_card_for(trainer, model_name: str | None = None, dataset: str | None = None, teacher: str | None = None,
                   teacher_revision: str | None = None, student: str | None = None,
                   metrics: dict[str, float] | None = None, **card_kwargs) -> str:
    """The model card of a `DistillationTrainer`'s student, with what the trainer knows filled in; `card_kwargs`:
    language, license, tags, finetuned_from, tasks, dataset_tags, dataset_args (as `Trainer.create_model_card`)."""
    from .forward import unwrap_model
    from .loading import library_of

    distill_model, args = trainer.distill_model, trainer.args
    if isinstance(dataset, (list, tuple)):
        dataset = dataset[0] if dataset else None
    return render_model_card(
        model_name=model_name or (args.hub_model_id or os.path.abspath(args.output_dir)).rstrip("/").split("/")[-1],
        repo_id=trainer.hub_model_id or args.hub_model_id,
        library_name=library_of(distill_model.student),
        teacher=teacher or args.teacher_model_name_or_path or type(unwrap_model(trainer.teacher)).__name__,
        teacher_revision=teacher_revision, student=student or type(distill_model.student).__name__,
        dataset=dataset or "custom", method=trainer.method.describe(), seed=args.seed, tap_pairs=trainer.tap_pairs,
        stages=list(trainer.stages_trained.items()) or ([(s.name, s.steps) for s in trainer.plan.stages]
                                                        if trainer.plan else []),
        metrics=metrics or {}, citation=trainer.method.citation, **card_kwargs,
        has_processor=trainer.processing_class is not None or os.path.isfile(os.path.join(args.output_dir,
                                                                                          "preprocessor_config.json")))


def write_model_card(trainer, **kwargs) -> str:
    """`model_card_for(trainer, **kwargs)`, written to `output_dir/README.md` on the saving process."""
    card = model_card_for(trainer, **kwargs)
    if trainer.args.should_save:
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        with open(os.path.join(trainer.args.output_dir, "README.md"), "w") as f:
            f.write(card)
    return card


def push_student(trainer, commit_message: str | None = None, token: str | None = None, revision: str | None = None,
                 private: bool | None = None, blocking: bool = True, folder: str | None = None):
    """Upload only the student's files of `folder` (default: the trainer's `output_dir`; see STUDENT_FILES) to its
    Hub model repo in one commit; arguments left None come from the trainer's `TrainingArguments` (hub_token,
    hub_revision, hub_private_repo). `blocking=False` returns the upload's `Future`."""
    args = trainer.args
    folder, repo_id = folder or args.output_dir, args.hub_model_id or trainer.hub_model_id
    token = token if token is not None else args.hub_token
    private = private if private is not None else args.hub_private_repo
    revision = revision if revision is not None else args.hub_revision
    from .loading import library_of

    needed = ("model.safetensors",) if library_of(trainer.distill_model.student) == "pytorch" else \
        ("config.json", "model.safetensors")  # a plain module's weights have no config
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: save the student with trainer.save_model() first.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="srm_hf_push_")  # removed by the upload's last step, blocking or not
    for name in STUDENT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy2(os.path.join(folder, name), staging)
    if blocking:
        try:
            return api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision,
                                     commit_message=commit_message or "Upload distilled student")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    future = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision, run_as_future=True,
                               commit_message=commit_message or "Upload distilled student")
    future.add_done_callback(lambda _: shutil.rmtree(staging, ignore_errors=True))
    return future


def push_dictionary(path: str, repo_id: str, token: str | None = None, private: bool | None = None):
    """Upload a `srm_dictionary.safetensors` on its own, for reuse with `srm_dictionary_path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No dictionary at {path}: run trainer.train_stages(['dictionary']), then "
                                "trainer.method.save_dictionary(path).")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_file(path_or_fileobj=path, path_in_repo=os.path.basename(path), repo_id=repo_id,
                           commit_message="Upload SRM dictionary")


class HubMixin:
    """The Trainer's Hub methods, for the student alone (see the module docstring)."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the student's repo (with `push_to_hub=True`, when the trainer is built, as the Trainer does): a
        run that cannot reach the Hub stops before training, not at its first save."""
        self.hub_model_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        self.push_in_progress = None
        if not self.is_world_process_zero():
            return
        try:
            repo = HfApi(token=token if token is not None else self.args.hub_token).create_repo(
                self.hub_model_id, private=private if private is not None else self.args.hub_private_repo,
                exist_ok=True)
        except Exception as error:  # offline, no token, no such namespace: the Hub's own message follows
            raise RuntimeError(
                f"push_to_hub: the Hub repo {self.hub_model_id!r} cannot be created or reached ({type(error).__name__}"
                f": {error}). Log in (`hf auth login`) or pass hub_token, check the connection and HF_HUB_OFFLINE, or "
                "train with push_to_hub=False and push the saved student later with trainer.push_to_hub()."
            ) from error
        self.hub_model_id = getattr(repo, "repo_id", self.hub_model_id)  # with the user's namespace

    def create_model_card(self, **kwargs) -> str:
        """Write README.md for the student into `output_dir` (kwargs: see `model_card_for`)."""
        return write_model_card(self, **kwargs)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Save the student, write its card (kwargs: see `model_card_for`) and publish both in one commit."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if getattr(self, "hub_model_id", None) is None:  # push_to_hub=False at construction
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        self._finish_current_push()  # a checkpoint's push still running goes first
        return push_student(self, commit_message, token=token, revision=revision, private=private, blocking=blocking)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """`hub_strategy="every_save"`: the checkpoint's student, in the background (its method state and optimizer
        files stay local)."""
        from transformers.utils.hub import PushInProgress

        if not self.is_world_process_zero() or self.args.hub_strategy == "end":
            return
        running = getattr(self, "push_in_progress", None)
        if not self.args.hub_always_push and running is not None and not running.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        try:
            future = push_student(self, f"Training in progress, step {self.state.global_step}", blocking=False,
                                  folder=checkpoint_folder)
        except Exception as error:  # the checkpoint is not marked complete yet: training and it must go on
            logger.warning(f"Pushing {checkpoint_folder} to {self.hub_model_id} failed ({type(error).__name__}: "
                           f"{error}); the checkpoint is kept locally and training goes on.")
            return
        self.push_in_progress = PushInProgress([future])
