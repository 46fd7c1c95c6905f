"""The optimizer of a distillation run: one optimizer whose parameter groups are tagged by what they hold."""

from .reference import coupled_adam
from .resume import check_optimizer_layout


def build_optimizer(distill_model, args, decay_names: set[str], default_cls_and_kwargs, resuming=None):
    """Groups: the student's and each child module's of the method, with and without weight decay (`decay_names`,
    the Trainer's rule: no biases or norm layers), each tagged `stage_group`. The configured `optim`
    (`default_cls_and_kwargs`, the Trainer's choice), or under `preset="reference"` Adam with coupled L2 on every
    parameter, BatchNorm and biases included."""
    reference = args.preset == "reference"
    if reference:
        decay_names = {n for n, _ in distill_model.named_parameters()}
    groups = distill_model.param_groups(decay_names, args.weight_decay)
    if reference:
        optimizer = coupled_adam(groups, args)
    else:
        optimizer_cls, optimizer_kwargs = default_cls_and_kwargs(args, distill_model)
        optimizer = optimizer_cls(groups, **optimizer_kwargs)
    if isinstance(resuming, str):  # the checkpoint `train()` resumes from
        check_optimizer_layout(resuming, optimizer)
    return optimizer
