"""The values added to the training logs (the loss, each method's loss terms, `trainer.log_metric`), averaged at each
log over the optimizer steps that the NaN guard kept."""

from collections import defaultdict

import torch
from accelerate.utils import gather_object


def kept_values(values: list[torch.Tensor], kept: bool | torch.Tensor) -> list[torch.Tensor]:
    """One optimizer step's `values` as its log window keeps them: each value if the step is kept, NaN (left out of
    the means) if not; for a flag on the device, selected there without the host waiting (a value in host memory is
    copied to the flag's device without waiting either)."""
    if isinstance(kept, bool):
        return values if kept else [torch.full_like(v, float("nan")) for v in values]
    return [torch.where(kept, v.to(kept.device, non_blocking=v.device.type == "cpu"), float("nan")) for v in values]


class LoggedMetrics:
    """Values by name since the last training log. The values of an optimizer step, from its first forward (`hold`)
    to the NaN guard's decision on it (`end_step`), are held: a skipped step's are left out of the means, as is any
    value that is not finite; a name with no finite value left logs NaN. Without the Trainer's NaN-loss filter
    (`logging_nan_inf_filter=False`) every value counts, as in the plain Trainer: a skipped step's, and NaN / inf ones,
    which the mean then is. Nothing is kept while the run logs nothing (`logging_strategy="no"`)."""

    def __init__(self):
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)  # kept for the next log
        self.step: dict[str, list[torch.Tensor]] = defaultdict(list)  # held for the guard's decision
        self.holding = False
        self.enabled = True
        self.nan_filter = True  # `logging_nan_inf_filter`: skipped steps and non-finite values left out

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if self.enabled:
            (self.step if self.holding else self.values)[name].append(torch.as_tensor(value).detach().float())

    def hold(self) -> None:
        """An optimizer step's forward starts: its values wait for `end_step`."""
        self.holding = True

    def end_step(self, kept: bool | torch.Tensor) -> None:
        """The guard has decided: the held values join the window's if it `kept` the step (a bool, or a boolean
        tensor on the device); later values join it at once."""
        for name, values in self.step.items():
            self.values[name].extend(kept_values(values, kept) if self.nan_filter else values)
        self.step.clear()
        self.holding = False

    def pop_means(self, accelerator) -> dict[str, float]:
        """Each name's mean over its kept finite values since the last log, pooled over the processes that logged
        it: names are matched across processes (one may log a name the others do not, or in another order), with
        one gather of the names and one reduction of every sum and count. The store is then empty, but for values
        still held."""
        names = sorted(self.values)
        if accelerator.num_processes > 1:
            names = sorted(set(gather_object(names)))
        if not names:
            return {}
        sums, counts = [], []
        for name in names:
            values = self.values.get(name) or [torch.zeros(0)]  # a name only other processes logged: none here
            stacked = torch.cat([v.reshape(-1).to(accelerator.device) for v in values])
            finite = stacked.isfinite() if self.nan_filter else torch.ones_like(stacked, dtype=torch.bool)
            sums.append(torch.where(finite, stacked, 0.0).sum())
            counts.append(finite.sum().float())
        totals = torch.stack([torch.stack(sums), torch.stack(counts)])  # [2, names]
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, "sum")
        self.values.clear()
        return {name: total / count if count else float("nan") for name, total, count in zip(names, *totals.tolist())}

    def start(self, enabled: bool, nan_filter: bool = True) -> None:
        """At the start of training: values left by an earlier or interrupted run are not this run's."""
        self.values.clear()
        self.step.clear()
        self.holding = False
        self.enabled = enabled
        self.nan_filter = nan_filter
