"""The recipe's checks of its own arguments, made before the data is read or a teacher trained
(`recipes/distill.py`)."""

import os

from srm_hf import DistillationConfig
from srm_hf.argparser import parse_kwargs
from srm_hf.loading import check_model_source, is_offline
from srm_hf.methods import METHODS
from srm_hf.metrics import make_compute_metrics
from srm_hf.resume import read_marker, refuse_model_only, resolve_resume


def compared(script_args) -> list[str]:
    return [m for m in script_args.compare if m != "none"]


def only_stage(method: str) -> str:
    stages = METHODS[method]().stages()
    if len(stages) != 1:
        raise ValueError(f"--compare takes one-stage methods (its length is set from the measured cost); {method!r} "
                         f"has the stages {[s.name for s in stages]}.")
    return stages[0].name


def resume_argument(value: str | None) -> str | bool | None:
    """--resume_from_checkpoint: a checkpoint folder, or true for the newest checkpoint in output_dir."""
    if value is None or value.lower() == "false":
        return None
    return True if value.lower() == "true" else value


def check_engine(config: DistillationConfig, script_args) -> None:
    """DeepSpeed allows one Trainer per process: the teacher must come ready-made and no comparison runs."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    if config.teacher_model_name_or_path is None:
        raise ValueError(
            "Under DeepSpeed this recipe cannot train its own teacher (DeepSpeed allows one Trainer per process). "
            "Train it first with `python recipes/train_teacher.py --output_dir DIR ...`, then pass "
            "--teacher_model_name_or_path DIR."
        )
    if compared(script_args):
        raise ValueError("Under DeepSpeed the comparison runs would need a second Trainer in the process: "
                         "pass --compare none (or run them separately without DeepSpeed).")


def check_before_loading(script_args, model_args, config):
    """What can fail without the data or the models, checked before either is read (or a teacher trained): the
    compared methods, the models' sources and keyword arguments, the metrics, the checkpoint to resume from and, with
    a push asked for, the Hub's reachability. Returns the metrics' `compute_metrics` and the checkpoint to resume
    from (resolved: a folder, or None)."""
    if config.stage_batch_sizes and compared(script_args):
        raise ValueError("--compare times every stage on one batch size, so it cannot weigh stages with their own "
                         "(--stage_batch_sizes): pass --compare none, or leave stage_batch_sizes unset.")
    if script_args.push_dictionary_to_hub and config.method != "srm":
        raise ValueError(f"--push_dictionary_to_hub needs --method srm (method {config.method!r} learns no "
                         "dictionary).")
    for name in compared(script_args):
        if name not in METHODS:
            raise ValueError(f"--compare {name}: no such method. Name one-stage methods among {sorted(METHODS)}, or "
                             "none.")
        only_stage(name)
        if name == config.method:
            raise ValueError(f"--compare {name} names the main run's method: its run would repeat the main one. Name "
                             "other one-stage methods, or none.")
    parse_kwargs(model_args.student_model_kwargs, "student_model_kwargs")
    parse_kwargs(model_args.teacher_model_kwargs, "teacher_model_kwargs")
    check_model_source(model_args.student_model_name_or_path, "--student_model_name_or_path")
    if config.teacher_model_name_or_path is not None:
        check_model_source(config.teacher_model_name_or_path, "--teacher_model_name_or_path")
    # a save_only_model checkpoint serves where it ends the plan (its student is loaded): refused later otherwise
    resume = resolve_resume(config.output_dir, resume_argument(config.resume_from_checkpoint), model_only=True)
    if resume is not None and (marker := read_marker(resume)).get("model_only") and \
            marker["global_step"] < sum(steps for _, steps in marker.get("plan") or []):
        refuse_model_only(resume)  # in the middle of its plan: nothing to go on from
    if (config.push_to_hub or script_args.push_dictionary_to_hub) and is_offline():
        raise ValueError("--push_to_hub / --push_dictionary_to_hub need the Hub, but the Hub client is offline "
                         "(HF_HUB_OFFLINE, or the Hub was unreachable at start): run online, or push the saved "
                         "output_dir later with `hf upload`.")
    return make_compute_metrics(tuple(script_args.metrics)), resume
