"""Host time per optimizer step: DistillationTrainer against a bare PyTorch loop doing the same arithmetic.

A small student on a fast GPU is bound by the host: Python, the dispatcher and kernel launches, not the GPU's
arithmetic. Tiny inputs make the arithmetic negligible on the CPU too, so what is left, per step, is that host
work: the CPU run measures what the Trainer and srm_hf add on the host, anywhere.

Pair: ResNet-18 (widths 24-192) teacher, ResNet-10t (widths 8-64) student, 1 channel, 10 classes. Rows:
  bare loop, alone / KD   DataLoader -> forward -> CE (+ KD as srm_hf computes it) -> backward -> clip -> the
                          Trainer's default optimizer
  Trainer alone / KD      DistillationTrainer, method 'alone' / 'kd'
  Trainer SRM paper       dictionary, SRM and KD stages, a third of the steps each
  ..., teacher compiled   with `--compile_teacher`: compile_teacher=True, torch_compile_mode `--compile_mode`
  ..., no NaN-loss filter  with `--no_nan_filter`: logging_nan_inf_filter=False (the plain Trainer's own wait for
                          the device, once per step, to keep NaN losses out of the logged average)
Each row times steps `--warmup`+1 to `--steps` (start-up left out; SRM: each stage after a third of the warm-up),
median of `--repeats` runs, runs interleaved.

    python recipes/benchmarks/host_overhead.py                     # CPU, 8 px, batch 2: results/host_overhead.md
    python recipes/benchmarks/host_overhead.py --device cuda --bf16 --size 28 --batch 64 --compile_teacher \
        --out /tmp/host_overhead_cuda.md
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from bench_report import write_report  # noqa: E402
from cost import Batches  # noqa: E402

from srm_hf import DistillationConfig, DistillationTrainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = 10


def images(args) -> Batches:
    """One-channel random images, enough for every step of a run."""
    return Batches(args.batch * args.steps, args.size, CLASSES, channels=1)


def pair():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=CLASSES, in_chans=1, channels=[24, 48, 96, 192],
                                stem_width=24)
    student = timm.create_model("resnet10t", num_classes=CLASSES, in_chans=1, channels=[8, 16, 32, 64],
                                stem_width=8)
    return teacher, student


class Clock:
    """Times windows of optimizer steps: from the start of step `first` to the end of step `last` (1-based), the
    device drained at both ends only, so that the host may run ahead of the device in between as it does in
    training."""

    def __init__(self, device: str, windows: dict[str, tuple[int, int]]):
        self.device, self.windows = device, windows
        self.started: dict[str, float] = {}
        self.ms_per_step: dict[str, float] = {}

    def now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_begins(self, step: int) -> None:
        for name, (first, _) in self.windows.items():
            if step == first:
                self.started[name] = self.now()

    def step_ends(self, step: int) -> None:
        for name, (first, last) in self.windows.items():
            if step == last:
                self.ms_per_step[name] = (self.now() - self.started[name]) / (last - first + 1) * 1000


class ClockCallback(TrainerCallback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.step_begins(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_ends(state.global_step)


def bare_loop(args, name: str, kd: bool) -> dict[str, float]:
    teacher, student = pair()
    teacher, student = teacher.to(args.device).eval().requires_grad_(False), student.to(args.device)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(  # the Trainer's default: fused AdamW
        TrainingArguments("/tmp/host_overhead", use_cpu=args.device == "cpu"), student)
    optimizer = optimizer_cls(student.parameters(), **optimizer_kwargs)
    loader = torch.utils.data.DataLoader(images(args), batch_size=args.batch,
                                         shuffle=True)
    clock = Clock(args.device, {name: (args.warmup + 1, args.steps)})
    autocast = torch.autocast(args.device, torch.bfloat16, enabled=args.bf16)
    for step, batch in enumerate(loader, 1):
        clock.step_begins(step)
        x, y = batch["pixel_values"].to(args.device), batch["labels"].to(args.device)
        with autocast:
            logits = student(x).float()
            loss = F.cross_entropy(logits, y)
            if kd:
                with torch.no_grad():
                    teacher_logits = teacher(x).float()
                kl = F.kl_div(F.log_softmax(logits / 4, -1), F.log_softmax(teacher_logits / 4, -1),
                              reduction="batchmean", log_target=True)
                loss = 0.5 * loss + 0.5 * 16 * kl  # srm_hf's KD defaults: α 0.5, T 4, the T² factor
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_ends(step)
    return clock.ms_per_step


def trainer_run(args, name: str, method: str, compile_teacher: bool = False, **extra) -> dict[str, float]:
    teacher, student = pair()
    if method == "srm":  # a third of the steps per stage, each stage timed after its own warm-up
        third = args.steps // 3
        steps = {"srm_dictionary_max_steps": third, "srm_max_steps": third}
        windows = {f"{name}: {stage} stage": (i * third + args.warmup // 3 + 1, (i + 1) * third)
                   for i, stage in enumerate(["dictionary", "SRM", "KD"])}
    else:
        steps, windows = {}, {name: (args.warmup + 1, args.steps)}
    compiled = {"compile_teacher": True, "torch_compile_mode": args.compile_mode} if compile_teacher else {}
    config = DistillationConfig(output_dir="/tmp/host_overhead", method=method, max_steps=args.steps, **steps,
                                per_device_train_batch_size=args.batch, bf16=args.bf16, use_cpu=args.device == "cpu",
                                report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=50,
                                dataloader_num_workers=0, **compiled, **extra)
    clock = Clock(args.device, windows)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, callbacks=[ClockCallback(clock)],
                                  train_dataset=images(args))
    trainer.train()
    return clock.ms_per_step


RUNS = {"bare loop, alone": lambda a, n: bare_loop(a, n, kd=False),
        "bare loop, KD": lambda a, n: bare_loop(a, n, kd=True),
        "Trainer alone": lambda a, n: trainer_run(a, n, "alone"), "Trainer KD": lambda a, n: trainer_run(a, n, "kd"),
        "Trainer SRM paper": lambda a, n: trainer_run(a, n, "srm")}
COMPILED = {"Trainer KD, teacher compiled": lambda a, n: trainer_run(a, n, "kd", compile_teacher=True),
            "Trainer SRM paper, teacher compiled": lambda a, n: trainer_run(a, n, "srm", compile_teacher=True)}
NO_NAN_FILTER = {
    "Trainer alone, no NaN-loss filter": lambda a, n: trainer_run(a, n, "alone", logging_nan_inf_filter=False),
    "Trainer KD, no NaN-loss filter": lambda a, n: trainer_run(a, n, "kd", logging_nan_inf_filter=False),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile_teacher", action="store_true",
                        help="Add KD and SRM runs with compile_teacher=True (torch_compile_mode --compile_mode).")
    parser.add_argument("--compile_mode", default="reduce-overhead")
    parser.add_argument("--no_nan_filter", action="store_true",
                        help="Add alone and KD runs with logging_nan_inf_filter=False.")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "host_overhead.md"))
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): only steps after it are timed.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here.")
    ms: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every row alike
        runs = RUNS | (COMPILED if args.compile_teacher else {}) | (NO_NAN_FILTER if args.no_nan_filter else {})
        for name, run in runs.items():
            for row, value in run(args, name).items():
                ms.setdefault(row, []).append(value)
                print(f"{row}: {value:.2f} ms/step", flush=True)
    median = {row: statistics.median(values) for row, values in ms.items()}

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    lines = [
        "# Host time per optimizer step", "",
        f"{device}, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.size}x{args.size} px, batch {args.batch}; "
        f"steps {args.warmup + 1}-{args.steps} of each run timed (SRM: the last "
        f"{args.steps // 3 - args.warmup // 3} steps of each stage), median of {args.repeats} interleaved runs.", "",
        "| run | ms per step | vs bare loop, alone | added by the Trainer and srm_hf (ms) |", "|---|---|---|---|",
    ]
    bare = {"Trainer alone": "bare loop, alone", "Trainer KD": "bare loop, KD",
            "Trainer SRM paper: KD stage": "bare loop, KD", "Trainer KD, teacher compiled": "bare loop, KD",
            "Trainer alone, no NaN-loss filter": "bare loop, alone", "Trainer KD, no NaN-loss filter": "bare loop, KD"}
    for name, value in median.items():
        added = f"{value - median[bare[name]]:+.2f}" if name in bare else ""
        lines.append(f"| {name} | {value:.2f} | {value / median['bare loop, alone']:.2f}x | {added} |")
    write_report(args.out, lines, "host_overhead.py", argv)


if __name__ == "__main__":
    main()
