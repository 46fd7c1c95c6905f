"""What srm_hf writes to disk.

An output folder (or checkpoint) holds the student alone, in the format of the library it came from, so plain
transformers / timm load it with no srm_hf import:

    transformers: config.json + model.safetensors   -> AutoModelForImageClassification.from_pretrained(dir)
    timm:         config.json + model.safetensors   -> timm.create_model("local-dir:" + dir, pretrained=True)
    other:        model.safetensors                 -> model.load_state_dict(safetensors.torch.load_file(...))

and beside it `srm_state.safetensors`: the dictionaries and heads, for resuming. `srm_dictionary.safetensors`
holds only the dictionaries, to skip stage 1 next time (`dictionary_path`).
"""

import json
import os

import safetensors.torch
import torch
import torch.nn as nn
from transformers import PreTrainedModel

STUDENT_WEIGHTS_NAME = "model.safetensors"
SRM_STATE_NAME = "srm_state.safetensors"
DICTIONARY_NAME = "srm_dictionary.safetensors"


def is_timm_model(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and "architecture" in cfg and type(model).__module__.startswith("timm.")


def library_of(model: nn.Module) -> str:
    """Which library loads this model back: "timm", "transformers" or "pytorch" (a plain state dict)."""
    if isinstance(model, PreTrainedModel):
        return "transformers"
    return "timm" if is_timm_model(model) else "pytorch"


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def save_student(student: nn.Module, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the student in its own library's format (see module docstring)."""
    os.makedirs(output_dir, exist_ok=True)
    state_dict = _contiguous(student.state_dict() if state_dict is None else state_dict)
    if isinstance(student, PreTrainedModel):
        student.save_pretrained(output_dir, state_dict=state_dict)
        return
    safetensors.torch.save_file(state_dict, os.path.join(output_dir, STUDENT_WEIGHTS_NAME), metadata={"format": "pt"})
    if is_timm_model(student):
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(student, os.path.join(output_dir, "config.json"))


def load_student_weights(student: nn.Module, checkpoint_dir: str) -> None:
    """Load the student's weights written by `save_student` back into `student`, in place."""
    path = os.path.join(checkpoint_dir, STUDENT_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No student weights at {path}. Pass a folder written by DistillationTrainer (a checkpoint-* folder "
            "or the output_dir after save_model())."
        )
    student.load_state_dict(safetensors.torch.load_file(path, device="cpu"))


def save_srm_state(state_dict: dict[str, torch.Tensor], path: str, taps: list[dict]) -> None:
    safetensors.torch.save_file(_contiguous(state_dict), path, metadata={"taps": json.dumps(taps)})


def load_srm_state(model: nn.Module, path: str, prefix: str = "") -> None:
    """Load dictionaries (and heads) saved by `save_srm_state` into a `DistillationModel`, checking every shape."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No SRM state at {path}: pass a file written by DistillationTrainer.")
    saved = safetensors.torch.load_file(path, device="cpu")
    own = model.state_dict()
    expected = [k for k in own if k.startswith(prefix) and not k.startswith("student.")]
    missing = [k for k in expected if k not in saved]
    wrong = [f"{k}: saved {tuple(saved[k].shape)}, needed {tuple(own[k].shape)}" for k in expected
             if k in saved and saved[k].shape != own[k].shape]
    if missing or wrong:
        with safetensors.safe_open(path, "pt") as f:
            taps = (f.metadata() or {}).get("taps", "?")
        raise ValueError(
            f"{path} does not fit this teacher/student pairing (missing {missing}, shape mismatch {wrong}). "
            f"It was saved for taps {taps}. Use the same teacher, taps, codeword_multiplier and sparsity_multiplier "
            "as when it was saved, or drop dictionary_path to learn a new dictionary."
        )
    model.load_state_dict({k: saved[k] for k in expected}, strict=False)
