"""How a stopped recipe run goes on (`recipes/distill.py --resume_from_checkpoint`): a checkpoint that ends a run's
plan has its student loaded, not trained again; each compared run goes on from its own checkpoints in
output_dir/<method>; the step times measured at the run's start are kept, so the compared runs keep their lengths.

    plan = planned(trainer)                                        # the stage plan, known before training
    if ends_plan(checkpoint, plan.describe(), schedule_settings(config), data_settings(config)):
        load_trained(trainer, checkpoint)                          # what train() would leave
"""

import copy
import json
import os
import re
import time

from accelerate.utils import broadcast_object_list
from compute import first_batch, stage_step_seconds
from distill_checks import only_stage
from transformers import TrainerState

from srm_hf import DistillationTrainer
from srm_hf.checkpoint import COMPLETE_NAME, load_distillation_model
from srm_hf.resume import changed, check_resume_plan, read_marker, refuse_model_only, resolve_resume

STEP_SECONDS = os.path.join("timing", "step_seconds.json")  # in output_dir: what a resumed run's compared runs reuse


def own_checkpoint(folder: str) -> str | None:
    """The newest complete checkpoint in a compared run's folder (output_dir/<method>), or None where it holds none:
    that run starts afresh."""
    found = os.path.isdir(folder) and any(re.fullmatch(r"checkpoint-\d+", f) and
                                          os.path.isfile(os.path.join(folder, f, COMPLETE_NAME))
                                          for f in os.listdir(folder))
    return resolve_resume(folder, True, model_only=True) if found else None


def ends_plan(folder: str, plan: list, settings: dict, data: dict | None = None) -> bool:
    """Whether the complete checkpoint `folder` ends this run's `plan` (`StagePlan.describe`): written under the same
    plan, at its last step, with the same optimizer and schedule `settings` (`schedule_settings`). Its student is then
    loaded, not trained again. Otherwise it must be one to resume from: refused here, before any training, where it
    is not (`check_resume_plan`: another plan, past this one's end, other settings or batches: `data`; or saved with
    save_only_model)."""
    marker = read_marker(folder)
    if marker.get("plan") != plan or marker["global_step"] < sum(steps for _, steps in plan):
        refuse_model_only(folder)
        check_resume_plan(folder, plan, settings, data)
        return False
    written = marker.get("settings") or {}  # older checkpoints record none
    if different := changed(written, settings):
        raise ValueError(f"{folder} ends this run's plan, but was trained with other optimizer or schedule settings "
                         f"({'; '.join(different)}): its student would be reported under this run's. Rerun with the "
                         "settings it was written with, or start this run fresh in another output_dir.")
    return True


def compared_checkpoint(output_dir: str, name: str, steps: int, series_ns: int) -> str | None:
    """The checkpoint the compared run `name` (`steps` long) goes on from when resuming is asked: the newest complete
    one in output_dir/<name> written since this series of runs measured its step times (`series_ns`, from
    `step_seconds`), or None (the run starts afresh). One written before belongs to an earlier run in the same
    output_dir, trained to other lengths or from other weights, and one saved with save_only_model before the run's
    end holds nothing to resume from: both are passed over. One past the run's length is refused here, before the
    main run trains."""
    folder = os.path.join(output_dir, name)
    checkpoint = own_checkpoint(folder)
    marker = read_marker(checkpoint) if checkpoint is not None else {}
    if checkpoint is not None and marker.get("written_ns", 0) < series_ns:
        print(f"{checkpoint} was written before this run measured its step times ({STEP_SECONDS}), by an earlier "
              f"run in {output_dir}: the compared run {name!r} starts afresh.")
        return None
    if marker.get("model_only") and marker["global_step"] < steps:
        print(f"{checkpoint} was saved with save_only_model=True before the end of its run, so it holds nothing to "
              f"resume from: the compared run {name!r} starts afresh.")
        return None
    if checkpoint is not None and marker["global_step"] > steps:
        raise ValueError(f"{checkpoint} is at step {marker['global_step']}, past the {steps} steps the compared run "
                         f"{name!r} has now (the main run's measured cost sets its length: the main run's plan or the "
                         f"step times changed): resume with the settings it was written with, or move {folder} away "
                         "to train that run afresh.")
    return checkpoint


def planned(trainer):
    """The trainer's stage plan as `train()` lays it out (`StagePlan`), known before training."""
    resuming, trainer.resuming = trainer.resuming, None  # the checkpoint is checked by the caller
    try:
        trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    finally:
        trainer.resuming = resuming
    return trainer.plan


def load_trained(trainer, folder: str) -> None:
    """What `train()` would leave, without training, from a checkpoint that ends the trainer's plan (`ends_plan`):
    its student and the method's modules, its trainer state (the logs of the report, the best checkpoint), the stages
    finished, and with load_best_model_at_end the best checkpoint's student."""
    plan = trainer.plan or planned(trainer)
    print(f"{folder} ends this run's plan ({plan}): its student is loaded, not trained again.")
    load_distillation_model(trainer.distill_model, folder)
    trainer.state = TrainerState.load_from_json(os.path.join(folder, "trainer_state.json"))
    for stage in plan.stages:
        trainer.method.stage_finished(stage)
        trainer.stages_trained[stage.name] = stage.steps
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best is not None and os.path.isdir(best):
        load_distillation_model(trainer.distill_model, best)


def step_seconds(trainer, initial, teacher, config, baselines: list[str], train, resuming: bool) -> tuple[dict, int]:
    """Per-step cost of every stage of the main method and of the compared ones, measured before training on
    throwaway copies of the initial student (timing takes optimizer steps) and kept in output_dir/STEP_SECONDS, with
    the time they were measured at (ns): the start of this series of runs. A resumed run reuses the times measured
    at its start, so its compared runs keep the lengths they were started (and checkpointed) with. Every process
    takes the main process's times, so that the compared runs have one length on all of them."""
    if not baselines:
        return {}, 0
    path = os.path.join(config.output_dir, STEP_SECONDS)
    needed = [(config.method, s.name) for s in trainer.method.stages()] + [(m, only_stage(m)) for m in baselines]
    kept = kept_step_seconds(path, config, needed) if resuming else None
    if kept is None:
        probes = {name: DistillationTrainer(model=copy.deepcopy(initial), teacher_model=teacher, train_dataset=train,
                                            args=config.for_method(name, output_dir=os.path.dirname(path),
                                                                   report_to="none", eval_strategy="no",
                                                                   save_strategy="no", load_best_model_at_end=False,
                                                                   metric_for_best_model=None, push_to_hub=False))
                  for name in dict.fromkeys([config.method, *baselines])}
    measured = kept or [stage_step_seconds(probes, first_batch(trainer)), time.time_ns()]
    seconds, measured_ns = broadcast_object_list(measured)  # each process timed its own steps: the main one's count
    if kept is None and trainer.is_world_process_zero():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"per_device_train_batch_size": config.per_device_train_batch_size, "measured_ns": measured_ns,
                       "seconds_per_step": {f"{m}/{s}": v for (m, s), v in seconds.items()}}, f, indent=2)
    return seconds, measured_ns


def kept_step_seconds(path: str, config, needed: list[tuple[str, str]]) -> list | None:
    """[step times, measured_ns] as this series of runs measured them at its start (`step_seconds`), or None where
    `path` holds none, or times of other methods or of another batch size (they are measured again)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        kept = json.load(f)
    seconds = {tuple(k.split("/", 1)): v for k, v in kept["seconds_per_step"].items()}
    if kept.get("per_device_train_batch_size") != config.per_device_train_batch_size or \
            not all(key in seconds for key in needed):
        print(f"{path} was measured for other methods or another batch size: measuring the step times again (the "
              "compared runs' lengths follow them).")
        return None
    print(f"Step times as measured at this run's start ({path}): the compared runs keep their lengths.")
    return [{key: seconds[key] for key in needed}, kept.get("measured_ns", 0)]
