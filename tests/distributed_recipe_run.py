"""The recipe (`recipes/distill.py`) under 2 processes, launched by tests/test_distributed.py:

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_recipe_run.py OUT RECIPE_FLAGS...

Each process times the compared method's step at another cost (a machine's processes never measure alike), and
writes OUT/lengths-rank{i}.json: the max_steps of every run it trained.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import distill  # noqa: E402
import distill_resume  # noqa: E402

out, argv = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ.get("RANK", "0"))
measure, train = distill_resume.stage_step_seconds, distill.DistillationTrainer.train
lengths = []


def rank_dependent_times(probes, batch, **kwargs):
    measured = measure(probes, batch, rounds=1, warmup=0)  # the probes step and are released as usual
    return {key: 0.01 if key[0] == "srm" else 0.004 * (1 + rank) for key in measured}


def recording_train(self, *args, **kwargs):
    lengths.append([os.path.basename(self.args.output_dir), self.args.max_steps])
    return train(self, *args, **kwargs)


distill_resume.stage_step_seconds = rank_dependent_times
distill.DistillationTrainer.train = recording_train
distill.main(argv + ["--output_dir", str(out / "run")])
(out / f"lengths-rank{rank}.json").write_text(json.dumps(lengths))
