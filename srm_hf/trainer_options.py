"""Trainer options that the stage plan cannot honour, refused when `DistillationConfig` is built (before any model
is loaded) or the trainer is (its own arguments), each with its reason and the way around. Options srm_hf handles
are handled where they act; this file holds only the refusals that belong to no other part.
"""

import inspect
from dataclasses import fields

from transformers import TrainingArguments

from .stage_batches import parse_stage_batch_sizes

PER_PARAMETER_OPTIMIZERS = ("galore", "apollo", "lomo")  # `optim` names whose handlers take the model, not groups
UNSUPPORTED = {"model_init": "pass the student as `model=`.",  # Trainer arguments that cannot work here: the fix
               "compute_loss_func": "the method computes the loss: write a `srm_hf.Method`, pass it as `method=`."}


def training_arguments_default(name: str):
    """The default of a TrainingArguments field in the installed transformers."""
    field = next(f for f in fields(TrainingArguments) if f.name == name)
    return field.default_factory() if callable(field.default_factory) else field.default


def name_of(option) -> str:
    """An option's value as the user wrote it (TrainingArguments turns some into enums)."""
    return str(getattr(option, "value", option))


def check_trainer_options(args) -> None:
    """Refuse, with a ValueError naming the option and the fix, a TrainingArguments option that DistillationTrainer
    would otherwise ignore or get wrong."""
    if args.auto_find_batch_size:
        raise ValueError("auto_find_batch_size=True retries with a smaller batch after running out of memory, which "
                         "changes the stage plan and its learning-rate schedule in the middle of a run: set "
                         "per_device_train_batch_size (and stage_batch_sizes) to a size that fits.")
    if args.label_names is not None and list(args.label_names) != ["labels"]:
        raise ValueError(f"label_names={args.label_names}: DistillationTrainer reads the class labels of each batch "
                         "from 'labels'. Rename your dataset's label column to 'labels' and leave label_names unset.")
    if getattr(args, "neftune_noise_alpha", None) is not None:
        raise ValueError("neftune_noise_alpha adds noise to a language model's token embeddings; image classifiers "
                         "have none: leave it unset.")
    if getattr(args, "use_liger_kernel", False):
        raise ValueError("use_liger_kernel patches language models' layers; no image model is patched: leave it "
                         "unset.")
    if getattr(args, "liger_kernel_config", None) is not None:
        raise ValueError("liger_kernel_config configures use_liger_kernel's patches of language models, which nothing "
                         "applies to an image classifier (use_liger_kernel is refused): leave it unset.")
    if args.optim_target_modules is not None:
        raise ValueError(f"optim_target_modules={args.optim_target_modules!r} names the layers a GaLore / APOLLO "
                         "optimizer projects; those optimizers are refused here and no other reads it, so it would "
                         "not limit what trains (each stage trains its own modules). Leave it unset.")
    if args.length_column_name != training_arguments_default("length_column_name"):
        raise ValueError(f"length_column_name={args.length_column_name!r} names the column that "
                         "train_sampling_strategy='group_by_length' sorts text by; that strategy is refused here "
                         "(images have no length) and nothing else reads it. Leave it unset.")
    if getattr(args, "parallelism_config", None) is not None:
        raise ValueError("parallelism_config shards the trained model over processes (tensor, context, sequence or "
                         "sharded data parallelism), which DistillationTrainer does not support: the teacher is placed "
                         "whole on every process and the taps hook whole modules. Leave it unset; for data "
                         "parallelism, launch with recipes/accelerate_configs/multi_gpu.yaml (DDP) or fsdp.yaml.")
    if "schedule_free" in name_of(args.optim):
        raise ValueError(f"optim={name_of(args.optim)}: a schedule-free optimizer averages its iterates over the whole "
                         "run, keeping the average's weights per param group and its iterate per parameter; the "
                         "stages reset the per-parameter state at each stage start (fresh moments) and set a group's "
                         "learning rate to 0 outside its stages, which breaks that average. Choose another optim "
                         "(e.g. adamw_torch_fused, with lr_scheduler_type for the schedule).")
    if any(name in name_of(args.optim) for name in PER_PARAMETER_OPTIMIZERS):
        raise ValueError(f"optim={name_of(args.optim)}: that optimizer is built from the model's layers, not from "
                         "parameter groups, and DistillationTrainer gives each stage's modules a group of their own. "
                         "Choose another optim (e.g. adamw_torch).")
    if getattr(args, "enable_jit_checkpoint", False):
        raise ValueError("enable_jit_checkpoint=True writes a checkpoint on SIGTERM that DistillationTrainer cannot "
                         "mark complete, so resuming would skip it: rely on save_steps instead.")
    if args.fp16 and args.device.type == "cpu":
        raise ValueError("fp16=True on the CPU: accelerate runs no fp16 autocast there, so the run would train in "
                         "float32 under an fp16 flag. Use bf16=True (the CPU's autocast), or train on a GPU.")
    if args.bf16_full_eval or args.fp16_full_eval:
        name = "bf16_full_eval" if args.bf16_full_eval else "fp16_full_eval"
        raise ValueError(f"{name}=True casts the student's weights to half precision for evaluation (and leaves "
                         "them so), while images stay float32: the student cannot run on them. Use bf16=True / "
                         "fp16=True, whose autocast covers evaluation too.")
    if args.train_sampling_strategy not in ("random", "sequential"):
        raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} balances text batches by their "
                         "token counts; images have none. Use 'random' or 'sequential'.")
    if args.push_to_hub and args.hub_strategy in ("checkpoint", "all_checkpoints"):
        raise ValueError(f"hub_strategy={name_of(args.hub_strategy)}: the Hub receives the student alone (a model "
                         "any library loads), not the checkpoints a run resumes from. Use hub_strategy='every_save' "
                         "or 'end', and keep output_dir to resume.")
    if args.stage_batch_sizes:
        check_stage_batch_options(args)


def check_stage_batch_options(args) -> None:
    """Under `stage_batch_sizes` the whole plan is one Trainer epoch drawn by one sampler (`srm_hf.stage_batches`)."""
    if args.logging_strategy == "epoch":
        raise ValueError("logging_strategy='epoch' with stage_batch_sizes: the whole stage plan is one epoch to the "
                         "Trainer, so it would log once. Use logging_strategy='steps' with logging_steps.")
    if args.eval_delay:
        raise ValueError(f"eval_delay={args.eval_delay} with stage_batch_sizes: the plan's stages are not Trainer "
                         "epochs, so the delay would not apply. Set eval_delay=0, or unset stage_batch_sizes.")
    if args.ignore_data_skip:
        raise ValueError("ignore_data_skip=True with stage_batch_sizes: the sampler would restart the plan and give a "
                         "resumed stage another stage's batch size. Leave ignore_data_skip=False.")
    if args.accelerator_config.split_batches:
        raise ValueError("accelerator_config split_batches=True with stage_batch_sizes: accelerate splits one batch "
                         "size across processes, and the stages have several. Leave split_batches False (the sizes "
                         "are per device), or unset stage_batch_sizes.")


def check_reference_overrides(args) -> None:
    """`preset="reference"` sets the optimizer (Adam, coupled L2) and turns clipping off: options it would
    override are refused rather than dropped."""
    if args.optim != training_arguments_default("optim"):
        raise ValueError("preset='reference' trains with the reference's Adam (coupled L2), not "
                         f"optim={name_of(args.optim)}: leave optim unset, or use preset='trainer'.")
    if args.optim_args or args.lr_scheduler_kwargs:
        raise ValueError("preset='reference' has its own optimizer and schedule: leave optim_args and "
                         "lr_scheduler_kwargs unset, or use preset='trainer'.")
    if args.max_grad_norm not in (training_arguments_default("max_grad_norm"), 0.0):
        raise ValueError(f"preset='reference' does not clip gradients (max_grad_norm=0): max_grad_norm="
                         f"{args.max_grad_norm} would be dropped. Leave it unset, or use preset='trainer'.")


def check_trainer_arguments(args, method, optimizers: tuple, kwargs: dict) -> None:
    """The Trainer's own arguments (kwargs: also compute_metrics and the datasets) and the options that cannot work
    with the stages of `method`."""
    for name, fix in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported: {fix}")
    stages = [s.name for s in method.stages()]
    parse_stage_batch_sizes(args.stage_batch_sizes, stages)  # names this method's stages
    if (args.ddp_find_unused_parameters is False or args.ddp_static_graph) and len(stages) > 1:
        name = "ddp_static_graph=True" if args.ddp_static_graph else "ddp_find_unused_parameters=False"
        raise ValueError(f"{name}: method {method.name!r} trains other modules in each of its stages "
                         f"({', '.join(stages)}), so DDP must look for unused parameters at each step. Leave "
                         "ddp_find_unused_parameters and ddp_static_graph unset.")
    evals = kwargs.get("eval_dataset")
    datasets = [kwargs.get("train_dataset"), *(evals.values() if isinstance(evals, dict) else [evals])]
    if args.remove_unused_columns and any(on_the_fly(d) for d in datasets):
        raise ValueError("remove_unused_columns=True with a dataset transformed on the fly (with_transform / "
                         "set_transform): the Trainer would drop the columns the transform reads. Set "
                         "remove_unused_columns=False (srm_hf's default).")
    compute_metrics = kwargs.get("compute_metrics")
    if args.batch_eval_metrics and compute_metrics is not None and not takes_compute_result(compute_metrics):
        raise ValueError("batch_eval_metrics=True calls compute_metrics after each evaluation batch with "
                         "compute_result=False (True on the last), which this compute_metrics does not take: the "
                         "first evaluation (in the last stage, after the others have trained) would fail. Give it a "
                         "compute_result argument (srm_hf.metrics.make_compute_metrics() has one), or drop "
                         "batch_eval_metrics.")
    optimizer, scheduler = optimizers
    if scheduler is not None:
        raise ValueError(f"optimizers=(optimizer, {type(scheduler).__name__}): the stages need their own schedule "
                         "(each param group's learning rate is 0 outside the stages that train it), which "
                         "DistillationTrainer builds. Pass optimizers=(optimizer, None) and choose the schedule with "
                         "lr_scheduler_type, lr_scheduler_kwargs and warmup_steps.")
    if optimizer is not None:
        check_stage_groups(optimizer)
    metric = args.metric_for_best_model
    if kwargs.get("compute_metrics") is None and metric is not None and not metric.endswith("loss"):
        raise ValueError(f"metric_for_best_model={metric!r}, but no compute_metrics gives it: evaluation reports "
                         "the loss alone. Pass compute_metrics (e.g. srm_hf.metrics.make_compute_metrics()), or select "
                         "on 'eval_loss'.")
    if args.prediction_loss_only and metric is not None and not metric.endswith("loss"):
        raise ValueError(f"metric_for_best_model={metric!r} with prediction_loss_only=True: evaluation then computes "
                         "the loss alone, never compute_metrics, so the first evaluation (in the last stage, after "
                         "the others have trained) would fail. Select on 'eval_loss', or drop prediction_loss_only.")
    if isinstance(evals, dict) and metric is not None and not any(
            metric.removeprefix("eval_").startswith(f"{name}_") for name in evals):
        raise ValueError(f"metric_for_best_model={metric!r} with eval_dataset of several sets ({', '.join(evals)}): "
                         f"evaluation reports each set's metrics as eval_<set>_<metric>, never {metric!r}, so the "
                         "first evaluation (in the last stage, after the others have trained) would fail. Name the "
                         f"set, e.g. metric_for_best_model='{next(iter(evals))}_{metric.removeprefix('eval_')}'.")
    if kwargs.get("optimizer_cls_and_kwargs") is not None and args.preset == "reference":
        raise ValueError("preset='reference' trains with the reference's Adam (coupled L2): pass no "
                         "optimizer_cls_and_kwargs, or use preset='trainer'.")


def takes_compute_result(compute_metrics) -> bool:
    """Whether `compute_metrics` accepts the `compute_result` keyword that `batch_eval_metrics` passes."""
    try:
        parameters = inspect.signature(compute_metrics).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): let the Trainer call it
        return True
    return any(p.name == "compute_result" or p.kind == p.VAR_KEYWORD for p in parameters)


def on_the_fly(dataset) -> bool:
    """A `datasets.Dataset` with a transform applied at read time (`with_transform` / `set_transform`)."""
    form = getattr(dataset, "format", None)
    return isinstance(form, dict) and form.get("type") == "custom"


def check_stage_groups(optimizer) -> None:
    """An optimizer passed in or built by an override must tag each param group with what it holds."""
    if any("stage_group" not in g for g in optimizer.param_groups):
        raise ValueError(
            "The optimizer's param groups lack the 'stage_group' tag ('student' or a child module of the method) "
            "that the stage schedule needs. Tag each group (as DistillationModel.param_groups does), or let "
            "DistillationTrainer build the optimizer (optimizer_cls_and_kwargs chooses its class)."
        )


def check_optimizer_holds(optimizer, model, plan) -> None:
    """Every trainable parameter of what each stage trains is in the optimizer (one passed in, or built by an
    override, may hold the student alone: the method's modules are made by the trainer), else they never change."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    modules = model.stage_modules()
    for stage in plan.stages:
        for name in stage.groups:
            prefix, module = modules[name]
            missing = [prefix + n for n, p in module.named_parameters() if p.requires_grad and id(p) not in held]
            if missing:
                raise ValueError(
                    f"Stage '{stage.name}' trains '{name}', but the optimizer lacks {len(missing)} of its parameters "
                    f"(e.g. {missing[0]!r}), which would never change. Build it from "
                    "trainer.distill_model.param_groups(decay_names, weight_decay) (it holds the method's modules, "
                    "made by the trainer), or let DistillationTrainer build it: optimizer_cls_and_kwargs chooses "
                    "the class.")


class RefusedTrainerFeatures:
    """Trainer methods that cannot drive a stage plan, refused with the way around."""

    def hyperparameter_search(self, *args, **kwargs):
        raise NotImplementedError("hyperparameter_search builds each trial's model with model_init, and a "
                                  "DistillationTrainer is built around the student passed as model= (its method's "
                                  "modules sized from it): run one DistillationTrainer per trial, e.g. in an optuna "
                                  "objective that builds the student, the config and the trainer.")
