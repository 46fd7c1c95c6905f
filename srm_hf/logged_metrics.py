"""The values added to the training logs (each method's loss terms, `trainer.log_metric`), averaged at each log."""

from collections import defaultdict

import torch


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

    def pop_means(self, device, reduce) -> dict[str, float]:
        """The mean of each name's finite values on `device`, passed through `reduce` (the mean over processes);
        the store is then empty."""
        means = {}
        for name, values in self.values.items():
            stacked = torch.stack(values).to(device)
            means[name] = reduce(torch.where(stacked.isfinite(), stacked, torch.nan).nanmean()).item()
        self.values.clear()
        return means

    def start(self, enabled: bool) -> None:
        """At the start of training: values left by an earlier or interrupted run are not this run's."""
        self.values.clear()
        self.enabled = enabled
