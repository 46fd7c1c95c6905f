"""What one dispatched operator costs the host: ATen operators against launches of srm_hf's Triton kernels.

    python recipes/benchmarks/launch_cost.py --device cuda --out /tmp/launch_cost.md   # the measurement that matters
    python recipes/benchmarks/launch_cost.py                                           # CPU: the ATen rows only

At small batches a fast GPU waits for the host, and `ops_per_step.py` counts what the host dispatches per step. The
count weighs every operator alike; on an H200 the steps with more Triton launches cost more per operator
(results/ops_per_step.md), as if a launch cost the host more than an ATen operator. This times each kind on tensors
so small that the GPU finishes each call before the host has queued the next: the loop's time per call is then the
host's. Each row is the median of `--repeats` loops of `--calls` calls, after a warm-up loop (which compiles the
Triton kernels). On the CPU the Triton rows are left out: Triton's interpreter runs the kernel itself, which is no
launch.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_report import command_line  # noqa: E402
from cost import emit  # noqa: E402
from srm_hf import fused, fused_loss  # noqa: E402


def per_call_us(fn, calls: int, repeats: int, device: str) -> float:
    """Median over `repeats` loops of the wall time per call of `fn`, in µs (the device synchronised around each)."""
    def loop():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6

    loop()  # warm-up: allocator, Triton's compilation and launcher
    return statistics.median(loop() for _ in range(repeats))


def operators(device: str, triton: bool) -> dict[str, Callable]:
    """name -> one call of the operator, on tiny tensors; srm_hf's Triton kernels too with `triton`."""
    x, y, out = (torch.rand(1024, device=device) for _ in range(3))
    m = torch.rand(64, 64, device=device)
    rows = {
        "ATen `add_` (1,024 floats)": lambda: x.add_(1.0),
        "ATen `sum` (1,024 floats)": lambda: x.sum(),
        "ATen `empty` (1,024 floats)": lambda: torch.empty(1024, device=device),
        "ATen `view`": lambda: x.view(32, 32),
        "ATen `mm` (64 × 64)": lambda: torch.mm(m, m),
    }
    if triton:
        from srm_hf.fused_dictionary_kernels import codes_grad_kernel

        logits = torch.randn(2, 8, 4, 4, device=device)  # 2 images, K = 8 atoms, 16 pixels
        labels, image = torch.zeros(2, 4, 4, dtype=torch.long, device=device), torch.rand(2, 8, device=device)
        rows |= {
            "Triton `codes_grad_kernel`, launched directly": lambda: codes_grad_kernel[(1,)](x, y, out, 1024,
                                                                                            BLOCK=1024),
            "Triton `codes_grad_kernel` through srm_hf's launcher": lambda: fused.run_elementwise(
                codes_grad_kernel, 1024, x, y, out),
            "srm_hf `srm_targets_fused` (1 launch, 3 `empty`)": lambda: fused.srm_targets_fused(logits, 2),
            "srm_hf `srm_tap_loss_fused`, forward (1 launch, 4 `empty`)":
                lambda: fused_loss.srm_tap_loss_fused(logits, labels, image, 1.0, 1.0, True),
        }
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="Markdown file to append the table to (default: print only).")
    args = p.parse_args(argv)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    rows = operators(args.device, triton=args.device == "cuda" and fused.triton_available())
    times = {row: per_call_us(fn, args.calls, args.repeats, args.device) for row, fn in rows.items()}
    lines = [f"## Host time per operator: {name}, torch {torch.__version__}"
             f"{', triton ' + fused.triton.__version__ if fused.triton_available() else ''}", "",
             f"Median of {args.repeats} loops of {args.calls} calls each, on tensors too small for the device to "
             "matter.", "", "| operator | µs per call |", "|---|---|"]
    lines += [f"| {row} | {us:.1f} |" for row, us in times.items()]
    if args.device == "cpu":
        lines += ["", "The Triton rows need CUDA (Triton's interpreter runs a kernel on the CPU instead of launching "
                  "it)."]
    lines += ["", f"Command: `{command_line('launch_cost.py', argv)}`", ""]
    emit("\n".join(lines), args.out)
    return times


if __name__ == "__main__":
    main()
