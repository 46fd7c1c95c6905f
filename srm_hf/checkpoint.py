"""What srm_hf writes to disk.

An output folder (or checkpoint) holds the student alone, in the format of the library it came from, so plain
transformers / timm load it with no srm_hf import:

    transformers: config.json + model.safetensors   -> AutoModelForImageClassification.from_pretrained(dir)
    timm:         config.json + model.safetensors   -> timm.create_model("local-dir:" + dir, pretrained=True)
    other:        model.safetensors                 -> model.load_state_dict(safetensors.torch.load_file(...))

and beside it `method_state.safetensors`: the method's own modules (SRM's dictionaries and heads, FitNet's
regressors, ...) with the method's description in its metadata, for resuming. A checkpoint folder is complete once
`checkpoint_complete.json` is in it, written after every other file (optimizer, scheduler, RNG, trainer state):
resuming takes the newest complete checkpoint and never one whose write was interrupted.
"""

import contextlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from transformers import PreTrainedModel

from .loading import is_timm_model, label_names_of

STUDENT_WEIGHTS_NAME = "model.safetensors"
METHOD_STATE_NAME = "method_state.safetensors"
COMPLETE_NAME = "checkpoint_complete.json"  # written last: a checkpoint folder without it was interrupted


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    _as_umask_allows(path)


def _as_umask_allows(path: str) -> None:
    """safetensors writes its files readable by their owner alone (0600); give them the mode every other output
    file gets (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def save_student(student: nn.Module, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the student in its own library's format (see module docstring)."""
    os.makedirs(output_dir, exist_ok=True)
    state_dict = _contiguous(student.state_dict() if state_dict is None else state_dict)
    if isinstance(student, PreTrainedModel):
        student.save_pretrained(output_dir, state_dict=state_dict)
        for name in os.listdir(output_dir):
            if name.endswith(".safetensors"):
                _as_umask_allows(os.path.join(output_dir, name))
        return
    save_safetensors(state_dict, os.path.join(output_dir, STUDENT_WEIGHTS_NAME), {"format": "pt"})
    if is_timm_model(student):
        from timm.models._hub import save_config_for_hf  # the config half of timm's `save_for_hf`

        names = label_names_of(student)
        names = names if names and len(names) == student.num_classes else None  # not a source checkpoint's
        save_config_for_hf(student, Path(output_dir) / "config.json",
                           model_config={"label_names": names} if names else None)
        _num_classes_at_top_only(os.path.join(output_dir, "config.json"))


def _num_classes_at_top_only(config_path: str) -> None:
    """timm records `num_classes` among the rebuild arguments (`model_args`) as well as at the config's top level,
    where timm reads it; transformers' TimmWrapper (`pipeline("image-classification")`, AutoModel) passes it itself
    and fails on the second copy: keep the top level's."""
    with open(config_path) as f:
        config = json.load(f)
    if isinstance(config.get("model_args"), dict) and config["model_args"].pop("num_classes", None) is not None:
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)


def load_student_weights(student: nn.Module, checkpoint_dir: str) -> None:
    """Load the student's weights written by `save_student` back into `student`, in place."""
    path = os.path.join(checkpoint_dir, STUDENT_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No student weights at {path}. Pass a folder written by DistillationTrainer (a checkpoint-* folder "
            "or the output_dir after save_model())."
        )
    student.load_state_dict(safetensors.torch.load_file(path, device="cpu"))


def read_matching(path: str, expected: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, dict]:
    """The tensors of a safetensors file, what does not fit `expected` ("" when everything does: same names and
    shapes), and the file's metadata."""
    saved = safetensors.torch.load_file(path, device="cpu")
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    wrong = [f"{k}: saved {tuple(saved[k].shape)}, needed {tuple(v.shape)}" for k, v in expected.items()
             if k in saved and saved[k].shape != v.shape]
    problems = ", ".join(f"{name} {items}" for name, items in
                         (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if items)
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    return saved, problems, metadata


def save_distillation_model(model: nn.Module, output_dir: str, state_dict: dict | None = None) -> None:
    """The student in its library's format and the method's modules in `METHOD_STATE_NAME` (a `DistillationModel`;
    `state_dict` as the Trainer passes it, by default the model's own)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise FloatingPointError(
            f"Not saving to {output_dir}: {len(broken)} tensors hold NaN/inf ({broken[:5]}). The run diverged; the "
            "checkpoints already written hold the last finite weights. Lower the learning rate or check the data."
        )
    mark_incomplete(output_dir)  # before its first file is written
    save_student(model.student, output_dir, {k[len("student."):]: v for k, v in state_dict.items()
                                              if k.startswith("student.")})
    method_state = _contiguous({k: v for k, v in state_dict.items() if k.startswith("method.")})
    save_safetensors(method_state, os.path.join(output_dir, METHOD_STATE_NAME),
                     {"method": json.dumps(model.method.describe()),
                      "taps": json.dumps(tap_names(model)),
                      "provenance": json.dumps(getattr(model, "provenance", {}))})


def tap_names(model: nn.Module) -> list[str]:
    return [f"{p.teacher.path}:{p.student.path}" for p in model.pairs]


def load_distillation_model(model: nn.Module, folder: str) -> None:
    """Load what `save_distillation_model` wrote into a `DistillationModel`, after checking that it was written by
    the same configuration (method, its settings, taps) and that the method's modules fit; nothing is loaded
    otherwise."""
    path = os.path.join(folder, METHOD_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No method state at {path}: pass a folder written by DistillationTrainer.")
    own = {k: v for k, v in model.state_dict().items() if k.startswith("method.")}
    saved, problems, metadata = read_matching(path, own)
    this_run = {"method": json.loads(json.dumps(model.method.describe())), "taps": tap_names(model),
                **json.loads(json.dumps(getattr(model, "provenance", {})))}
    # what the checkpoint records (older ones record less: only what is there is compared)
    written = {**json.loads(metadata.get("provenance", "{}")),
               **{k: json.loads(metadata[k]) for k in ("method", "taps") if k in metadata}}
    differences = [f"{k}: {written[k]!r} there, {this_run[k]!r} here" for k in this_run
                   if k in written and written[k] != this_run[k]]
    if differences:
        raise ValueError(
            f"{folder} was written by another configuration ({'; '.join(differences)}). Resume with the settings it "
            "was written with, or start this run fresh in its own output_dir (without resume_from_checkpoint)."
        )
    if problems:
        raise ValueError(
            f"{path} does not fit this method and pairing ({problems}). It was saved by "
            f"{metadata.get('method', '?')}; this run is {json.dumps(model.method.describe())}. "
            "Resume with the same method, taps and settings, or start from scratch."
        )
    load_student_weights(model.student, folder)
    model.load_state_dict(saved, strict=False)


def mark_incomplete(folder: str) -> None:
    """A folder about to be written (again: a rerun, or `train()` after `train_stages()`, counts steps from 0 into
    the same checkpoint-N names) is incomplete until `mark_complete` says otherwise."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, COMPLETE_NAME))
