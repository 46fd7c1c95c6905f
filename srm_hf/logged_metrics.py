"""The values added to the training logs (each method's loss terms, `trainer.log_metric`), averaged at each log."""

from collections import defaultdict

import torch
from accelerate.utils import gather_object


class LoggedMetrics:
    """Values by name since the last training log. A value that is not finite (a step the NaN guard skipped) is
    left out of the mean, as `logging_nan_inf_filter` leaves it out of the logged loss; a name with no finite value
    logs NaN. Nothing is kept while the run logs nothing (`logging_strategy="no"`)."""

    def __init__(self):
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.enabled = True

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if self.enabled:
            self.values[name].append(torch.as_tensor(value).detach().float())

    def pop_means(self, accelerator) -> dict[str, float]:
        """Each name's mean over its finite values since the last log, pooled over the processes that logged it:
        names are matched across processes (one may log a name the others do not, or in another order), with one
        gather of the names and one reduction of every sum and count. The store is then empty."""
        names = sorted(self.values)
        if accelerator.num_processes > 1:
            names = sorted(set(gather_object(names)))
        if not names:
            return {}
        sums, counts = [], []
        for name in names:
            values = self.values.get(name) or [torch.zeros(0)]  # a name only other processes logged: none here
            stacked = torch.cat([v.reshape(-1) for v in values]).to(accelerator.device)
            finite = stacked.isfinite()
            sums.append(torch.where(finite, stacked, 0.0).sum())
            counts.append(finite.sum().float())
        totals = torch.stack([torch.stack(sums), torch.stack(counts)])  # [2, names]
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, "sum")
        self.values.clear()
        return dict(zip(names, (totals[0] / totals[1]).tolist()))  # no finite value: 0 / 0, NaN

    def start(self, enabled: bool) -> None:
        """At the start of training: values left by an earlier or interrupted run are not this run's."""
        self.values.clear()
        self.enabled = enabled
