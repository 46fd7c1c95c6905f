"""A batch size per stage (`stage_batch_sizes`), as the SRM reference trains (512 / 384 / 128 on CIFAR).

    DistillationConfig(..., stage_batch_sizes={"dictionary": 512, "srm": 384})   # other stages: the usual size

The Trainer builds one data loader for one training loop; here that loader's batch sampler runs the whole stage
plan: each stage draws `steps × gradient_accumulation_steps` batches of its own size from seeded permutations of
the training set (a new permutation per pass over the data, from `data_seed`, else `seed`; in order under
train_sampling_strategy="sequential"). The run is one "epoch" to the Trainer, so resuming
skips batches at the sampler, without loading them, and continues exactly. A stage sized in epochs counts passes at
its own batch size. On an `AugmentedDataset` the pass number reaches the random views (index = row + pass × rows),
so every pass sees new views.
"""

import math
from functools import partial

import numpy as np
import torch
from transformers.trainer_utils import seed_worker

from .argparser import parse_kwargs
from .stages import StagePlan, stage_steps


def parse_stage_batch_sizes(value, stage_names: list[str] | None = None) -> dict[str, int]:
    """`stage_batch_sizes` as given (a mapping, or its JSON text) -> {stage name: batch size}, checked (the names
    too, when the method's `stage_names` are given)."""
    value = parse_kwargs(value, "stage_batch_sizes", '{"dictionary": 512}')
    unknown = [k for k in value if stage_names is not None and k not in stage_names]
    if unknown:
        raise ValueError(f"stage_batch_sizes names {unknown}, which are not stages of this method: {stage_names}.")
    bad = {k: v for k, v in value.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"stage_batch_sizes: {bad} must be positive integers (per device).")
    return dict(value)


def plan_with_batch_sizes(specs, sizes: dict[str, int], args, num_examples: int) -> tuple[StagePlan, list, list]:
    """The stage plan, each stage's batch size and its optimizer steps per pass over the data; a stage in epochs
    counts them at its own batch size, and the last stage takes `max_steps`, or `num_train_epochs` at its own."""
    batch = [sizes.get(spec.name, args.per_device_train_batch_size) for spec in specs]
    per_epoch = [math.ceil((num_examples // b if args.dataloader_drop_last else math.ceil(num_examples / b))
                           / args.gradient_accumulation_steps) for b in batch]
    last = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch[-1])
    plan = StagePlan([(spec, stage_steps(spec, n, last)) for spec, n in zip(specs, per_epoch)])
    return plan, batch, per_epoch


class StageBatchSampler(torch.utils.data.Sampler):
    """Index batches for the whole plan (see the module docstring)."""

    def __init__(self, num_examples: int, plan: StagePlan, batch_sizes: list[int], accumulation: int, seed: int,
                 drop_last: bool, pass_in_index: bool, shuffle: bool = True):
        self.n, self.plan, self.sizes, self.accumulation = num_examples, plan, batch_sizes, accumulation
        self.seed, self.drop_last, self.pass_in_index, self.shuffle = seed, drop_last, pass_in_index, shuffle

    def __len__(self) -> int:
        return self.plan.total_steps * self.accumulation

    def __iter__(self):
        passes, order, pos = -1, None, self.n
        for stage, size in zip(self.plan.stages, self.sizes):
            pos = self.n  # each stage starts a pass of its own
            for _ in range(stage.steps * self.accumulation):
                if pos >= self.n or (self.drop_last and pos + size > self.n):
                    passes += 1
                    order = np.random.default_rng([self.seed, passes]).permutation(self.n) if self.shuffle else \
                        np.arange(self.n)
                    pos = 0
                rows = order[pos : pos + size]
                pos += size
                yield (rows + passes * self.n if self.pass_in_index else rows).tolist()


def stage_batch_loader(trainer) -> torch.utils.data.DataLoader:
    """The trainer's training loader under `stage_batch_sizes`; sets `trainer.plan` and its steps per epoch."""
    args, dataset = trainer.args, trainer.train_dataset
    if args.world_size > 1:
        raise ValueError("stage_batch_sizes runs in one process: unset it (one batch size for every stage) to train "
                         f"on {args.world_size} processes.")
    if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
        raise ValueError("stage_batch_sizes draws every pass in one loader: set dataloader_persistent_workers=False.")
    specs = trainer.distill_model.stage_specs(skip=trainer.stages_done)  # names checked by the trainer at init
    trainer.plan, batch, per_epoch = plan_with_batch_sizes(specs, args.stage_batch_sizes, args, len(dataset))
    trainer.steps_per_epoch = {stage.name: n for stage, n in zip(trainer.plan.stages, per_epoch)}
    seed = args.data_seed if args.data_seed is not None else args.seed
    sampler = StageBatchSampler(len(dataset), trainer.plan, batch, args.gradient_accumulation_steps, seed,
                                args.dataloader_drop_last, getattr(dataset, "pass_in_index", False),
                                shuffle=args.train_sampling_strategy != "sequential")
    loader = trainer.accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                                                     **loader_options(trainer)))
    loader.stage_plan = trainer.plan  # what `check_loader_plan` looks for
    return loader


def check_loader_plan(trainer, dataloader) -> None:
    """Under `stage_batch_sizes`, the training loader must be `stage_batch_loader`'s: it plans the stages."""
    if getattr(dataloader, "stage_plan", None) is None or dataloader.stage_plan is not trainer.plan:
        raise ValueError(
            f"stage_batch_sizes is set, but the training loader ({type(dataloader).__name__}) is not the one "
            "DistillationTrainer.get_train_dataloader builds, which plans the stages at their batch sizes. An override "
            "of get_train_dataloader must return super().get_train_dataloader() there; or unset stage_batch_sizes."
        )


def loader_options(trainer) -> dict:
    """The DataLoader settings the Trainer gives its own training loader, but the batch size and sampler."""
    args = trainer.args
    workers = args.dataloader_num_workers
    options = dict(collate_fn=trainer.data_collator, num_workers=workers, pin_memory=args.dataloader_pin_memory,
                   worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index))
    if workers > 0:  # the DataLoader refuses these without workers; the last two are fields since transformers 5.10
        options["prefetch_factor"] = args.dataloader_prefetch_factor
        options["multiprocessing_context"] = getattr(args, "dataloader_multiprocessing_context", None)
        options["in_order"] = getattr(args, "dataloader_in_order", True)
    return options
