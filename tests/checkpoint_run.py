"""A tiny SRM run saving a checkpoint every 2 steps, for tests/test_checkpoint_faults.py.

    python tests/checkpoint_run.py OUT_DIR [--kill STEP:POINT] [--resume] [--save_total_limit N]

--kill makes the process SIGKILL itself while writing the checkpoint of STEP, at POINT: 'start' (nothing written
yet), 'student' (the student and method state written, not the optimizer or trainer state), 'marker' (everything
written but the completion marker, older checkpoints not yet rotated out).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import make_trainer  # noqa: E402

import srm_hf.trainer_checkpoints as checkpoints  # noqa: E402
from srm_hf import DistillationTrainer  # noqa: E402


def main():
    out = Path(sys.argv[1])
    kill = sys.argv[sys.argv.index("--kill") + 1].split(":") if "--kill" in sys.argv else None
    step, point = (int(kill[0]), kill[1]) if kill else (None, None)

    def die(at: str, global_step: int):
        if global_step == step and point == at:
            os.kill(os.getpid(), signal.SIGKILL)

    original_mark = checkpoints.mark_complete

    def mark_complete(folder, step, **kwargs):
        die("marker", step)
        original_mark(folder, step, **kwargs)

    checkpoints.mark_complete = mark_complete
    original_save = DistillationTrainer._save

    def save(self, output_dir=None, state_dict=None):
        die("start", self.state.global_step)
        original_save(self, output_dir, state_dict)
        die("student", self.state.global_step)

    DistillationTrainer._save = save
    torch.use_deterministic_algorithms(True)
    limit = int(sys.argv[sys.argv.index("--save_total_limit") + 1]) if "--save_total_limit" in sys.argv else None
    trainer = make_trainer(out, max_steps=2, srm_dictionary_max_steps=2, srm_max_steps=2, save_strategy="steps",
                           save_steps=2, save_total_limit=limit)
    trainer.train(resume_from_checkpoint=True if "--resume" in sys.argv else None)
    trainer.save_model(str(out / "final"))


if __name__ == "__main__":
    main()
