"""How many operators each training step dispatches: the host's work per step, counted rather than timed.

    python recipes/benchmarks/ops_per_step.py                   # prints the table (--out FILE appends it to FILE)
    TRITON_INTERPRET=1 python recipes/benchmarks/ops_per_step.py --fused   # the Triton kernels' steps too

A GPU runs a small model's step as fast as the host can queue it, and every operator the host dispatches costs it
some microseconds (dispatcher, autograd, the launch), so the count is what a fast GPU pays for per step, whatever
machine counts it. The steps are those of `cost.py` (the same trainer, batch and variants) at a small input. Every
ATen operator that reaches the dispatcher is counted once, views included; a Triton kernel counts as one launch,
and the work the interpreter does to run it on the CPU is not counted.
"""

import argparse
import collections
import os
import sys
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import bench_report  # noqa: E402
import cost  # noqa: E402
from srm_hf import fused  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class OpCount(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is on, by name."""

    def __init__(self):
        super().__init__()
        self.ops, self.on = collections.Counter(), True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class KernelLaunches:
    """Counts each launch of a fused kernel as one operator and pauses `count` while the kernel runs (under
    TRITON_INTERPRET the interpreter dispatches torch operators of its own). Wraps `srm_hf.fused.launch_kernel`, which
    every launch goes through, or in an older checkout on PYTHONPATH the launchers it had, counted the same way."""

    def __init__(self):
        self.count, self.saved = None, {}

    def wrap(self, launch):
        def counted(kernel, *args, **meta):
            if self.count is None:  # a warm-up call
                return launch(kernel, *args, **meta)
            self.count.ops[f"triton: {kernel.fn.__name__}"] += 1
            self.count.on = False
            try:
                return launch(kernel, *args, **meta)
            finally:
                self.count.on = True
        return counted

    def __enter__(self):
        names = next((names for names in (("launch_kernel",), ("_launch",), ("_run", "_run_elementwise"))
                      if hasattr(fused, names[0])))  # this checkout's launcher, or an older one's
        for name in (n for n in names if hasattr(fused, n)):
            self.saved[name] = getattr(fused, name)
            setattr(fused, name, self.wrap(self.saved[name]))
        return self

    def __exit__(self, *exc):
        for name, launch in self.saved.items():
            setattr(fused, name, launch)


HOST_ONLY = {  # operators that launch no device work: views, metadata, allocations, profiler marks
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice", "split", "squeeze", "t",
    "transpose", "unbind", "unsqueeze", "view", "_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "lift_fresh", "_record_function_enter_new", "_record_function_exit"}


def device_work(ops: collections.Counter) -> int:
    """Operators and launches that queue work on the device (a CUDA graph replays these: at small batches its time
    follows their number), counting each as one kernel: an estimate, since a convolution's backward or a fused
    optimizer step launches several."""
    return sum(n for name, n in ops.items() if name not in HOST_ONLY)


def count_step(fn, launches: KernelLaunches) -> collections.Counter:
    """Operators of one call of `fn`, after two calls to warm it up (lazy state, first-step allocations)."""
    launches.count = None
    fn()
    fn()
    with OpCount() as count:
        launches.count = count
        fn()
    launches.count = None
    return count.ops


def report(args, counts: dict[str, collections.Counter]) -> str:
    floor = sum(counts["floor: student step + teacher forward"].values())
    teacher = sum(counts["teacher forward"].values())
    precision = "bf16 autocast" if args.bf16 else "fp32"
    lines = [f"Pair `{args.teacher}` → `{args.student}`, batch {args.batch}, {args.size}×{args.size} inputs, {precision}, "
             f"torch {torch.__version__}.", "",
             "| step | operators dispatched | of which fused-kernel launches | vs floor | vs teacher forward | "
             "device work (est.) |", "|---|---|---|---|---|---|"]
    for name, ops in counts.items():
        total = sum(ops.values())
        launches = sum(v for k, v in ops.items() if k.startswith("triton: "))
        lines.append(f"| {name} | {total} | {launches} | {total - floor:+d} | {total - teacher:+d} | "
                     f"{device_work(ops)} |")
    lines += ["", "Device work: the operators and launches that queue work on the device, each counted as one kernel "
              "(views, allocations and profiler marks left out); what a CUDA graph replays.", "",
              f"Command: `{bench_report.command_line('ops_per_step.py')}`", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cost.add_pair_arguments(p, teacher="resnet18", student="resnet10t", batch=2, size=28)
    p.add_argument("--fused", action="store_true", help="Also count SRM's steps through the Triton kernels "
                   "(needs TRITON_INTERPRET=1: the count runs on the CPU).")
    p.add_argument("--bf16", action="store_true", help="Under bf16 autocast (on the CPU), as GPU runs train: the "
                   "casts it adds are counted.")
    p.add_argument("--details", action="store_true", help="Print the operators of every step by name.")
    p.add_argument("--out", default=None, help="Markdown file to append the table to (default: print only).")
    args = p.parse_args(argv)
    if args.fused and not fused.triton_available():
        p.error("--fused needs Triton (it comes with CUDA builds of torch).")
    if args.fused and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--fused counts on the CPU, through Triton's interpreter: set TRITON_INTERPRET=1 in the environment.")
    torch.manual_seed(0)
    trainer, batch = cost.build(argparse.Namespace(**{**vars(args), "device": "cpu", "bf16": False}))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else nullcontext
    steps = cost.variants(trainer, batch, autocast, fused=args.fused)
    with KernelLaunches() as launches:
        counts = {name: count_step(fn, launches) for name, fn in steps.items()}
    if args.details:
        for name, ops in counts.items():
            print(name, dict(ops.most_common()))
    cost.emit(report(args, counts), args.out)
    return counts


if __name__ == "__main__":
    main()
