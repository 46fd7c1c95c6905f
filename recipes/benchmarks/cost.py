"""What SRM costs on top of the unavoidable: a student training step plus a teacher forward (the floor).

    python recipes/benchmarks/cost.py                        # CPU, fp32: writes recipes/benchmarks/results/cost.md
    python recipes/benchmarks/cost.py --device cuda --bf16   # GPU, bf16 autocast
    python recipes/benchmarks/cost.py --steps 5 --out /tmp/cost.md   # a quick check
    python recipes/benchmarks/cost.py --device cuda --bf16 --size 28 --batch 64 --teacher resnet18 --student resnet10t
                                                             # the small-model setting
    python recipes/benchmarks/cost.py --device cuda --bf16 --channels_last   # models and images in NHWC
On CUDA the SRM steps run three times: with the eager maths, with the fused Triton kernels (`srm_kernels`), and
through the kernels that make the projections themselves (", kernel projections": `srm_kernel_projections`).

All variants run interleaved (one step of each per round, in turn) on the same batch, after warm-up rounds; each
reports the median step time over the rounds and its peak memory: on a GPU the allocator's peak during the step, on
the CPU the bytes autograd saves for backward (activations), the part of training memory that SRM adds to.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from srm_hf import DistillationConfig, DistillationTrainer  # noqa: E402
from srm_hf.forward import in_layout  # noqa: E402
from srm_hf.fused import use_fused  # noqa: E402
from srm_hf.methods import SRM  # noqa: E402
from srm_hf.stages import StagePlan  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = {s.name: s for mode in ("paper", "joint") for s in SRM(mode=mode).stages()}  # by name: what each runs


class Batches(torch.utils.data.Dataset):
    """n random images (fixed seed) with random labels."""

    def __init__(self, n, size, classes, channels=3):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, channels, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class SavedBytes:
    """Bytes of the distinct tensors autograd saves for backward during a forward pass."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in self.seen:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def build(args):
    classes = 100
    teacher = timm.create_model(args.teacher, num_classes=classes)
    student = timm.create_model(args.student, num_classes=classes)
    config = DistillationConfig(output_dir="/tmp/srm_cost", use_cpu=args.device == "cpu", bf16=args.bf16,
                                report_to="none", srm_mode="joint", per_device_train_batch_size=args.batch,
                                disable_tqdm=True, max_steps=1, srm_dictionary_max_steps=1,
                                channels_last=args.channels_last)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=Batches(args.batch, args.size, classes))
    trainer.create_optimizer()
    trainer.plan = StagePlan([(STAGES["joint"], 1)])
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)]))
    batch["pixel_values"] = in_layout(batch["pixel_values"], args.channels_last)  # as the trainer's steps give it
    return trainer, batch


FUSED = {", fused": False, ", fused, kernel projections": True}  # name suffix -> srm_kernel_projections


def variants(trainer, batch, autocast, fused=None):
    """The steps to time, by name; SRM's steps also through the Triton kernels when `fused` (default: on CUDA)."""
    model, teacher = trainer.model, trainer.teacher
    model.train()

    def step(loss):
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def student_alone():
        with autocast():
            logits = model(pixel_values=batch["pixel_values"]).logits
        step(F.cross_entropy(logits.float(), batch["labels"]))

    def floor():
        with torch.no_grad(), autocast():
            teacher(batch["pixel_values"])
        trainer.teacher_hooks.clear()
        student_alone()

    def stage(name, kernels="eager", projections=False):
        def run():
            trainer.plan = StagePlan([(STAGES[name], 1)])
            trainer.method.kernels, trainer.method.kernel_projections = kernels, projections
            with autocast():
                loss = trainer.compute_loss(model, batch)
            step(loss)

        return run

    def teacher_forward():
        with torch.no_grad(), autocast():
            teacher(batch["pixel_values"])
        trainer.teacher_hooks.clear()

    fns = {
        "student step alone": student_alone,
        "floor: student step + teacher forward": floor,
        "KD step": stage("kd"),
        "SRM joint step": stage("joint"),
        "SRM stage-2 step": stage("srm"),
        "teacher forward": teacher_forward,
        "dictionary step": stage("dictionary"),
    }
    if use_fused("auto", batch["pixel_values"]) if fused is None else fused:  # the kernels beside the eager maths
        for suffix, projections in FUSED.items():
            fns[f"SRM joint step{suffix}"] = stage("joint", "triton", projections)
            fns[f"SRM stage-2 step{suffix}"] = stage("srm", "triton", projections)
            fns[f"dictionary step{suffix}"] = stage("dictionary", "triton", projections)
    return fns


def measure(fns, rounds, warmup, device):
    times = {k: [] for k in fns}
    memory = {k: 0 for k in fns}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync()
            start = time.perf_counter()
            with (SavedBytes() if device == "cpu" else nullcontext()) as saved:
                fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else saved.total
                memory[name] = max(memory[name], peak)
    return times, memory


def profile(fn, device: str, warmup: int, steps: int) -> str:
    """The operators that take the most time in `steps` runs of one step, as torch.profiler counts them."""
    for _ in range(warmup):
        fn()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda"
                                                          else [])
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    print(table)
    return table


def paired_ratio(times: dict, name: str, reference: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratio: pairing each round with its reference cancels machine drift."""
    ratios = sorted(a / b for a, b in zip(times[name], times[reference]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return q[1], q[0], q[2]


def report(args, trainer, times, mem) -> str:
    floor_name = "floor: student step + teacher forward"
    floor_mem = mem[floor_name]
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    memory_kind = "peak allocated during the step" if args.device == "cuda" else "bytes saved for backward"
    lines = [
        f"## {device}, {'bf16 autocast' if args.bf16 else 'fp32'}{', channels_last' if args.channels_last else ''}",
        "",
        f"Pair: `{args.teacher}` → `{args.student}`, batch {args.batch}, {args.size}×{args.size} inputs, 100 classes, "
        f"m = {trainer.args.srm_codeword_multiplier}, s = {trainer.args.srm_sparsity_multiplier}, "
        f"taps: {', '.join(f'{p.teacher.path}→{p.student.path}' for p in trainer.tap_pairs)}. "
        f"{args.steps} interleaved rounds after {args.warmup} warm-up rounds; ratios are medians of per-round ratios "
        "(quartiles in brackets).",
        "",
        f"| step | median time (ms) | vs floor | memory: {memory_kind} (MiB) | vs floor |",
        "|---|---|---|---|---|",
    ]
    steps = ("student step alone", floor_name, "KD step", "SRM joint step", "SRM stage-2 step",
             *(f"SRM {stage} step{suffix}" for suffix in FUSED for stage in ("joint", "stage-2")))
    for name in (n for n in steps if n in times):
        ratio, lo, hi = paired_ratio(times, name, floor_name)
        lines.append(f"| {name} | {1000 * statistics.median(times[name]):.1f} | {ratio:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{mem[name] / 2**20:.1f} | {mem[name] / max(floor_mem, 1):.3f} |")
    lines += ["", "| step | median time (ms) | vs teacher forward |", "|---|---|---|"]
    for name in (n for n in ("teacher forward", "dictionary step", *(f"dictionary step{x}" for x in FUSED))
                 if n in times):
        ratio, lo, hi = paired_ratio(times, name, "teacher forward")
        lines.append(f"| {name} | {1000 * statistics.median(times[name]):.1f} | {ratio:.3f} [{lo:.3f}, {hi:.3f}] |")
    lines += ["", f"Command: `python {' '.join(sys.argv)}`", ""]
    return "\n".join(lines)


def emit(text: str, out: str | None) -> None:
    """Print a report, and append it to the markdown file `out` when one is given."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def add_pair_arguments(p: argparse.ArgumentParser, teacher="resnet34", student="resnet18", batch=16, size=112):
    """The timm pair, batch and input size that `build` reads."""
    p.add_argument("--teacher", default=teacher)
    p.add_argument("--student", default=student)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--size", type=int, default=size)
    p.add_argument("--channels_last", action="store_true", help="Models and images in NHWC (`channels_last`).")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_arguments(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="Markdown file to append the table to (default: print only).")
    p.add_argument("--profile", default=None, metavar="STEP",
                   help="Instead of timing, print torch.profiler's top operators for this step (e.g. 'SRM joint step').")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    trainer, batch = build(args)
    autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    if args.profile:
        return profile(variants(trainer, batch, autocast)[args.profile], args.device, args.warmup, args.steps)
    times, mem = measure(variants(trainer, batch, autocast), args.steps, args.warmup, args.device)
    emit(report(args, trainer, times, mem), args.out)
    return times, mem


if __name__ == "__main__":
    main()
