"""What a CUDA graph makes of each training step: the steps of `cost.py`, eager and replayed from a captured graph.

    python recipes/benchmarks/graph_step.py --device cuda --bf16 --batch 16 --size 112      # the small-batch setting
    python recipes/benchmarks/graph_step.py --device cuda --bf16 --size 28 --batch 64 --teacher resnet18 \
        --student resnet10t                                                                # the small-model pair
    python recipes/benchmarks/graph_step.py --steps 2 --warmup 1 --size 32 --batch 2     # CPU: eager steps only

At small batches a GPU waits for the host to dispatch operators: on an H100 every kind of step took 24.7–33.3 µs per
dispatched operator (results/ops_per_step.md), so there SRM's cost follows its operator count. A CUDA graph replays a
whole step (forward, backward and optimizer) as one launch, whatever its count: this measures how close that brings
SRM to the floor, before any of it is built into the trainer.

Each step is captured once, after warm-up runs on a side stream, with what capture needs: a fused AdamW with
`capturable=True` over the model's trainable parameters (in place of the Trainer's optimizer, for the eager steps
too, so both run the same update) and autocast's weight cache off. Eager and replayed steps then run interleaved
(`cost.measure`); every step, eager or replayed, first copies the batch (images and labels) into the tensors the
graph was captured with, as a training loop would. The replayed SRM steps use the fused kernels (Triton launches
are captured like any other). On the CPU only the eager steps run: CUDA graphs need a CUDA device.
"""

import argparse
import os
import statistics
import sys
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import cost  # noqa: E402

FLOOR, TEACHER = "floor: student step + teacher forward", "teacher forward"
STEPS = (FLOOR, "KD step", *(f"SRM {stage} step{suffix}" for suffix in cost.FUSED for stage in ("joint", "stage-2")),
         TEACHER, *(f"dictionary step{suffix}" for suffix in cost.FUSED))


def captured(step, warmup: int = 3):
    """Replays of `step` from a CUDA graph captured after `warmup` runs on a side stream (lazy state, kernel
    compilation and the optimizer's moments happen there, not in the graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def feeding(batch: dict, run):
    """`run` after copying a fresh batch into `batch`'s tensors (those the steps read, and the graph captured)."""
    fresh = {k: v.clone() for k, v in batch.items()}

    def step():
        for k, v in batch.items():
            v.copy_(fresh[k])
        run()
    return step


def steps(args) -> dict:
    torch.manual_seed(0)
    trainer, batch = cost.build(args)
    cuda = args.device == "cuda"
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]  # student, SRM heads and dictionaries
    trainer.optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda, capturable=cuda)
    autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16, cache_enabled=False)) if args.bf16 \
        else nullcontext
    variants = cost.variants(trainer, batch, autocast, fused=cuda)
    fns = {}
    for name in STEPS:
        if name not in variants:  # the fused steps where Triton cannot run them (the CPU)
            name = next(name.removesuffix(suffix) for suffix in cost.FUSED if name.endswith(suffix))
        fns[name] = feeding(batch, variants[name])
        if cuda:
            fns[f"{name}, graph"] = feeding(batch, captured(variants[name]))
    return trainer, fns


def report(args, trainer, times) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (eager steps only: graphs need CUDA)"
    layout = ", channels_last" if args.channels_last else ""
    lines = [f"## {device}, {'bf16 autocast' if args.bf16 else 'fp32'}{layout}: eager and CUDA-graph steps", "",
             f"Pair `{args.teacher}` → `{args.student}`, batch {args.batch}, {args.size}×{args.size} inputs, taps: "
             f"{', '.join(f'{p.teacher.path}→{p.student.path}' for p in trainer.tap_pairs)}. {args.steps} "
             f"interleaved rounds after {args.warmup} warm-up rounds; ratios are medians of per-round ratios.", "",
             "| step | eager ms | vs eager floor | graph ms | vs graph floor |", "|---|---|---|---|---|"]
    for name in (n for n in times if not n.endswith(", graph")):
        reference = TEACHER if name.startswith("dictionary") else FLOOR
        row = f"| {name} | {1000 * statistics.median(times[name]):.2f} | "
        row += f"{cost.paired_ratio(times, name, reference)[0]:.3f} | "
        if f"{name}, graph" in times:
            graph = f"{name}, graph"
            row += f"{1000 * statistics.median(times[graph]):.2f} | "
            row += f"{cost.paired_ratio(times, graph, f'{reference}, graph')[0]:.3f} |"
        else:
            row += "— | — |"
        lines.append(row)
    lines += ["", "The dictionary step is compared with a teacher forward, every other step with the floor.", "",
              f"Command: `python {' '.join(sys.argv)}`", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cost.add_pair_arguments(p)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="Markdown file to append the table to (default: print only).")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible here.")
    trainer, fns = steps(args)
    times, _ = cost.measure(fns, args.steps, args.warmup, args.device)
    cost.emit(report(args, trainer, times), args.out)
    return times


if __name__ == "__main__":
    main()
