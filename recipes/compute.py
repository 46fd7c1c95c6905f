"""Equal compute by measured cost: the time of one optimizer step of each stage of each method, measured on the
same batch in interleaved rounds (so a busy machine slows every method alike), and the number of steps of a
one-stage method that costs as much as a whole run of another.

    seconds = stage_step_seconds({"srm": srm_probe, "kd": kd_probe}, batch)   # {(method, stage): seconds}
    kd_steps = steps_for_cost(run_cost(srm_trainer.plan, seconds, "srm"), seconds[("kd", "kd")])

The probes are throwaway `DistillationTrainer`s: timing takes optimizer steps, which change their weights.
"""

import statistics
import time

import torch

from srm_hf.forward import on_device
from srm_hf.stages import StagePlan


def stage_step_seconds(probes: dict, batch: dict, rounds: int = 8, warmup: int = 2) -> dict[tuple[str, str], float]:
    """Median seconds of one training step (forward, backward, optimizer step) of every stage of every probe."""
    steps = {}
    for name, trainer in probes.items():
        trainer.create_optimizer()
        model = trainer.model
        model.train()
        for spec in trainer.method.stages():
            steps[(name, spec.name)] = (trainer, StagePlan([(spec, 1)]))
    times = {key: [] for key in steps}
    for r in range(warmup + rounds):
        for key, (trainer, plan) in steps.items():
            trainer.plan = plan
            start = time.perf_counter()
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if r >= warmup:
                times[key].append(time.perf_counter() - start)
    for trainer in probes.values():
        if trainer.teacher_hooks is not None:
            trainer.teacher_hooks.remove()
    return {key: statistics.median(values) for key, values in times.items()}


def run_cost(plan: StagePlan, seconds: dict[tuple[str, str], float], name: str) -> float:
    """Measured seconds of a whole run: Σ over its stages of steps × seconds per step."""
    return sum(stage.steps * seconds[(name, stage.name)] for stage in plan.stages)


def steps_for_cost(cost: float, seconds_per_step: float) -> int:
    return max(1, round(cost / seconds_per_step))


@torch.no_grad()
def first_batch(trainer) -> dict:
    """One training batch, on the trainer's device."""
    batch = next(iter(trainer.get_train_dataloader()))
    return on_device(batch, trainer.args.device)
