"""Whether a checkpoint can be resumed, and what its completion marker records for that.

A checkpoint folder is complete once `checkpoint_complete.json` is in it, written after every other file
(`mark_complete`). The marker records the step, the stage plan, the NaN guard's counts, the settings that the
restored optimizer and schedule would override, and the size of every file beside it; before anything is loaded,
resuming refuses a folder whose files are missing or truncated, one written under another plan or with other
settings, and optimizer state of another layout or optimizer.
"""

import json
import os
import re
import time

import torch
from transformers.utils import logging

from .checkpoint import COMPLETE_NAME

logger = logging.get_logger(__name__)

SCHEDULE_FIELDS = ("learning_rate", "srm_dictionary_learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
                   "adam_epsilon", "optim_args")  # kept in the param groups and the schedule's base rates, which
# resuming restores from the checkpoint (the schedule's shape and the optimizer's class are built from the config)


def schedule_settings(args) -> dict:
    """The options whose values a resumed run takes from the checkpoint's optimizer and scheduler state instead of
    the config (learning rates, betas, weight decay: saved in the param groups; the schedule's base rates)."""
    settings = {}
    for name in SCHEDULE_FIELDS:
        value = getattr(args, name, None)
        plain = isinstance(value, (bool, int, float, dict, type(None)))
        settings[name] = value if plain else str(getattr(value, "value", value))  # enums as written
    return settings


def data_settings(args) -> dict:
    """What places a step in the data: the images per optimizer step (per process × accumulation × processes, and
    per stage under stage_batch_sizes) and whether a partial last batch is dropped. A resumed run counts its place in
    the epoch and the images still to come in these steps."""
    return {"images_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "stage_batch_sizes": dict(args.stage_batch_sizes or {}), "dataloader_drop_last": args.dataloader_drop_last}


def file_sizes(folder: str) -> dict[str, int]:
    """The size of every file in a checkpoint folder (sub-folders too: DeepSpeed's and FSDP's), by relative path."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def mark_complete(folder: str, step: int, model_only: bool = False, plan: list | None = None,
                  nonfinite: dict | None = None, settings: dict | None = None, data: dict | None = None) -> None:
    """Mark a checkpoint folder complete, once everything else in it is written: the marker is written under a
    temporary name and renamed, so it exists only whole. `model_only`: saved with save_only_model (nothing to resume
    the optimizer, schedule or stage from); `plan`: the stage plan it was written under (`StagePlan.describe`);
    `nonfinite`: the NaN guard's counts (`NonFiniteGuard.counts`); `settings`: `schedule_settings` of the run;
    `data`: its `data_settings`. The size of every file written before the marker is recorded with it."""
    tmp = os.path.join(folder, COMPLETE_NAME + ".tmp")
    files = file_sizes(folder)
    with open(tmp, "w") as f:
        json.dump({"global_step": step, "model_only": model_only, "plan": plan, "nonfinite": nonfinite,
                   "settings": settings, "data": data, "files": files,
                   "written_ns": time.time_ns()}, f)  # which checkpoint is newest, also in a copied folder
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, COMPLETE_NAME))


def read_marker(folder: str) -> dict:
    """What `mark_complete` recorded in a complete checkpoint folder."""
    with open(os.path.join(folder, COMPLETE_NAME)) as f:
        return json.load(f)


def changed(written: dict, here: dict) -> list[str]:
    """The recorded settings that differ from this run's, each as 'name: there, here' (keys an older marker lacks are
    not compared)."""
    return [f"{k}: {written[k]!r} there, {v!r} here" for k, v in (here or {}).items()
            if k in written and written[k] != v]


def check_resume_plan(folder: str, plan: list, settings: dict | None = None, data: dict | None = None) -> None:
    """Refuse to resume from a checkpoint written under another stage plan (its step would fall in another stage;
    only the last stage may change length), or at the end of this one (nothing is left to train), or with other
    `settings` (`schedule_settings`), which the restored optimizer and schedule would silently override, or other
    batches (`data_settings`), which would resume elsewhere in the data. A
    checkpoint at the end of a plan that begins this one (`train_stages(["dictionary"])`, then `train()`) goes on
    into the rest."""
    marker = read_marker(folder)
    written_settings = marker.get("settings") or {}  # older checkpoints record none
    if different := changed(written_settings, settings):
        raise ValueError(f"{folder} was written with other optimizer or schedule settings ({'; '.join(different)}); "
                         "resuming restores its optimizer and schedule, which would keep those and ignore this "
                         "run's. Resume with the settings it was written with, or start a new run from its student.")
    written_data = marker.get("data") or {}
    if different := changed(written_data, data):
        raise ValueError(f"{folder} was written with other batches ({'; '.join(different)}; images_per_step is "
                         "per_device_train_batch_size × gradient_accumulation_steps × processes): the resumed run "
                         "would place its step elsewhere in the epoch and train on other images than the interrupted "
                         "one. Resume with the batch settings it was written with, or start a new run from its "
                         "student.")
    step, written = marker["global_step"], marker.get("plan")  # older checkpoints record no plan

    def described(stages):
        return " -> ".join(f"{name} ({steps} steps)" for name, steps in stages)

    begins = written is not None and len(written) < len(plan) and [list(s) for s in plan[:len(written)]] == \
        [list(s) for s in written] and step == sum(steps for _, steps in written)
    if written is not None and not begins and ([s[0] for s in written] != [s[0] for s in plan]
                                               or written[:-1] != plan[:-1]):
        raise ValueError(f"{folder} was written under the stage plan {described(written)}, and this run's is "
                         f"{described(plan)}: its step {step} would resume in another stage. Resume with the settings "
                         "it was written with (stage lengths, epochs, batch size, training-set size; only the last "
                         "stage may change length). A checkpoint written by `train()` after `train_stages()` resumes "
                         "with `train_stages()` of the stages that followed; one written at the end of "
                         "`train_stages()`, with `train()` (or `train_stages()` of those stages and the ones after).")
    if step >= sum(steps for _, steps in plan):
        raise ValueError(f"{folder} is at step {step}, the end of this run's plan ({described(plan)}): nothing is left "
                         f"to train. Load the student from it, lengthen the last stage ('{plan[-1][0]}') to train on, "
                         "or go on with the stages after it: train(resume_from_checkpoint=...).")


def check_optimizer_layout(folder: str, optimizer) -> None:
    """Refuse to resume an optimizer state saved for other parameter groups (another srm_hf version's grouping, or
    a weight_decay that now splits a module's group) or by an optimizer without this one's hyper-parameters (another
    `optim`: AdamW's state for SGD), before torch's own error stops the run at its first step. An optimizer of the
    same kind (adamw_torch for adamw_torch_fused) may take over."""
    path = os.path.join(folder, "optimizer.pt")
    if not os.path.isfile(path):  # DeepSpeed / FSDP write their own files
        return
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors left on disk
    saved = [len(g["params"]) for g in state["param_groups"]]
    here = [len(g["params"]) for g in optimizer.param_groups]
    if saved != here:
        raise ValueError(f"{folder} holds optimizer state for {len(saved)} parameter groups of {saved} tensors, and "
                         f"this run's optimizer has {len(here)} of {here}: it was written with another weight_decay "
                         "or srm_hf version. Resume with those, or start a new run from its student "
                         "(trainer.save_model() saved it there).")
    if missing := sorted(set(optimizer.defaults) - set(state["param_groups"][0] if saved else optimizer.defaults)):
        raise ValueError(f"{folder} holds the state of another optimizer: its parameter groups have no {missing}, "
                         f"which this run's {type(optimizer).__name__} needs. Resume with the `optim` it was written "
                         "with, or start a new run from its student (trainer.save_model() saved it there).")


def resolve_resume(output_dir: str, resume: str | bool | None, model_only: bool = False) -> str | bool | None:
    """`resume_from_checkpoint` for the Trainer: True becomes the newest complete checkpoint in `output_dir`, the
    one marked complete last (step numbers restart when `train()` follows `train_stages()` in the same folder;
    interrupted ones are named and skipped); a given folder must be complete. One saved with save_only_model is
    refused unless `model_only` (a caller that only loads its models where it ends the plan: `refuse_model_only`)."""
    if resume is None or resume is False:
        return resume
    if resume is True:
        found = [f for f in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", f)] \
            if os.path.isdir(output_dir) else []
        folders = [os.path.join(output_dir, f) for f in found]
        marked = [f for f in folders if os.path.isfile(os.path.join(f, COMPLETE_NAME))]
        complete = sorted(marked, reverse=True, key=lambda f: (  # markers that record no time: by step alone
            read_marker(f).get("written_ns", 0), int(f.rsplit("-", 1)[1])))
        skipped = sorted(set(folders) - set(marked))
        if skipped:
            logger.warning(f"Skipping {skipped}: no {COMPLETE_NAME}, so their writing was interrupted.")
        if not complete:
            raise ValueError(f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint (folders "
                             f"checkpoint-N with {COMPLETE_NAME}). Start without resume_from_checkpoint.")
        logger.warning(f"Resuming from {complete[0]}, the newest complete checkpoint.")
        resume = complete[0]
    elif not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint={resume!r}: no such folder. Pass a checkpoint-N folder of an earlier "
                         "run, or resume_from_checkpoint=True for the newest complete one in output_dir.")
    elif not os.path.isfile(os.path.join(resume, COMPLETE_NAME)):
        raise ValueError(f"{resume} is not a complete checkpoint (no {COMPLETE_NAME}: its writing was interrupted, or "
                         "DistillationTrainer did not write it). Pass an earlier checkpoint, or "
                         "resume_from_checkpoint=True for the newest complete one.")
    marker = read_marker(resume)
    now = file_sizes(resume)
    if damaged := sorted(f"{name} ({'missing' if name not in now else f'{now[name]} bytes, written {size}'})"
                         for name, size in (marker.get("files") or {}).items() if now.get(name) != size):
        raise ValueError(f"{resume} was marked complete, but its files changed since: {', '.join(damaged)}. "
                         "Resume from another checkpoint (a path, or remove this folder and pass "
                         "resume_from_checkpoint=True), or start a new run from a student saved elsewhere.")
    if not model_only:
        refuse_model_only(resume)
    return resume


def refuse_model_only(folder: str) -> None:
    """A checkpoint saved with save_only_model holds nothing to resume training from."""
    if read_marker(folder).get("model_only"):
        raise ValueError(f"{folder} was saved with save_only_model=True: it holds the models, but no optimizer, "
                         "schedule or stage state to resume from. Load the student from it and start a new run, or "
                         "resume from a checkpoint saved with save_only_model=False.")
