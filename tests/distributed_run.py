"""One short distillation run, launched by tests/test_distributed.py under 1 or 2 processes.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_run.py OUT MODE PER_DEVICE_BATCH

(MODE "paper+dictionary" loads the dictionary file named by the environment variable SRM_DICTIONARY.)

Each rank writes OUT/rank{i}.pt: its final DistillationModel state, logged losses, which files it wrote, and how
the teacher and the student were wrapped.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from conftest import PatternDataset, make_config  # noqa: E402
from test_accumulation import NormFreeNet  # noqa: E402

import srm_hf.trainer_checkpoints as checkpoints_module  # noqa: E402
from srm_hf import DistillationTrainer  # noqa: E402
from srm_hf.forward import unwrap_model  # noqa: E402

out, batch = sys.argv[1], int(sys.argv[3])
mode, _, layout = sys.argv[2].partition("+")  # e.g. "joint+channels_last"; "paper+dictionary": a loaded one
writes = []


def recording(fn):
    def wrapper(*args, **kwargs):
        writes.append(fn.__name__)
        return fn(*args, **kwargs)

    return wrapper


checkpoints_module.save_distillation_model = recording(checkpoints_module.save_distillation_model)
original_rng_save = DistillationTrainer._save_rng_state


def late_rng_save(self, output_dir):  # rank 1 writes its RNG state late: the marker must still come after it
    if self.accelerator.process_index == 1:
        time.sleep(1.0)
    original_rng_save(self, output_dir)


DistillationTrainer._save_rng_state = late_rng_save

args = make_config(__import__("pathlib").Path(out), srm_mode=mode, per_device_train_batch_size=batch, optim="sgd",
                   learning_rate=0.1, srm_dictionary_max_steps=2, srm_max_steps=2, max_steps=2, save_strategy="steps",
                   save_steps=3, channels_last=layout == "channels_last",
                   srm_dictionary_path=os.environ["SRM_DICTIONARY"] if layout == "dictionary" else None)
trainer = DistillationTrainer(model=NormFreeNet(8, 1), teacher_model=NormFreeNet(16, 0), args=args,
                              train_dataset=PatternDataset(64))


class RankMetrics(TrainerCallback):  # names logged by some ranks only, in another order on each
    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            trainer.log_metric("probe/b", 10.0)
            trainer.log_metric("probe/a", 1.0)
        else:
            trainer.log_metric("probe/c", 5.0)
            trainer.log_metric("probe/b", 20.0)


trainer.add_callback(RankMetrics())
trainer.train()
trainer.save_model()
rank = trainer.accelerator.process_index
torch.save(
    {
        "world": trainer.accelerator.num_processes,
        "nhwc": [p.is_contiguous(memory_format=torch.channels_last) for p in trainer.distill_model.parameters()
                 if p.dim() == 4],
        "state": {k: v.cpu() for k, v in trainer.distill_model.state_dict().items()},
        "losses": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
        "probes": [{k: v for k, v in e.items() if k.startswith("probe/")} for e in trainer.state.log_history
                   if "loss" in e],
        "writes": writes,
        "teacher_type": type(trainer.teacher).__name__,
        "teacher_unwrapped": unwrap_model(trainer.teacher) is trainer.teacher,
        "model_type": type(trainer.model_wrapped).__name__,
        "teacher_grad": any(p.requires_grad for p in trainer.teacher.parameters()),
    },
    os.path.join(out, f"rank{rank}.pt"),
)
# leave the process group cleanly, then skip the interpreter's teardown: gloo's threads can abort it ("terminate
# called without an active exception", seen now and then, also after destroy_process_group); the results are written
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
