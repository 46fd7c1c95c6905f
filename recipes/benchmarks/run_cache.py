"""Finished benchmark runs in a JSON-lines file, so that a restarted benchmark skips what is done.

    runs = Runs("results/quality_runs.jsonl")
    result = runs.get("pair|size|method|setting|seed", lambda: train_and_evaluate(...))   # computed once

With `read_only=True` a missing run raises `Missing` instead of being computed (`quality.py --report_done`).
"""

import json
import os


class Missing(Exception):
    """A run that `--report_done` would need but that has not been run yet."""


class Runs:
    """Finished runs (and measured costs) in a JSON-lines file: a restarted benchmark skips what is done."""

    def __init__(self, path: str, read_only: bool = False):
        self.path, self.done, self.read_only = path, {}, read_only
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    self.done[record["key"]] = record["value"]

    def get(self, key: str, compute):
        if key not in self.done and self.read_only:
            raise Missing(key)
        if key not in self.done:
            self.done[key] = compute()
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "value": self.done[key]}) + "\n")
        return self.done[key]
