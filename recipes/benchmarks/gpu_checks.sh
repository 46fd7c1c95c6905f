#!/usr/bin/env bash
# The GPU checks of the fused SRM kernels and of the per-step costs, on a CUDA machine with srm_hf's dependencies,
# from the repository root, in parts that can run as separate calls; the reports land in OUT_DIR.
#
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR tests     # tests/test_fused*.py, tests/test_gpu.py (not FSDP/DeepSpeed)
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR large     # cost.py at 224 px / batch 128 and 112 px / batch 16
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR layout    # the same with models and images in NHWC (--channels_last)
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR small     # cost.py at 28 px, srm_ops.py, host_overhead.py,
#                                                           # launch_cost.py
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR graphs    # graph_step.py: eager and CUDA-graph steps, small batches
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR pipeline  # small_model_pipeline.py (FASHION_MNIST_DIR: IDX files)
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR sweep     # srm_ops.py --sweep: the fused kernels' launch settings
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR profile   # torch.profiler tables at 224 px / batch 128: the floor,
#                                                           # the fused joint and dictionary steps (both projection
#                                                           # paths), a teacher forward
#   bash recipes/benchmarks/gpu_checks.sh OUT_DIR quality   # fused_quality.py: SRM's quality runs eager and fused
#                                                           # (FASHION_MNIST_DIR: IDX files)
#
# With BASE set to a folder holding an earlier commit's srm_hf/ (`git archive COMMIT srm_hf | tar -x -C DIR`,
# BASE=DIR), `large` and `graphs` also time that code on the same machine, right after this checkout's run (reports
# *_base.md): the comparison a change of the kernels needs, since timings from different machine starts differ.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR tests|large|layout|small|graphs|pipeline|sweep|profile|quality}
part=${2:?usage: gpu_checks.sh OUT_DIR tests|large|layout|small|graphs|pipeline|sweep|profile|quality}
mkdir -p "$out"
B=recipes/benchmarks
export HF_HUB_OFFLINE=1
nvidia-smi -L
both() {  # a benchmark whose last two arguments are `--out FILE.md`: this checkout, then BASE's srm_hf if set
  "$@"
  if [ -n "${BASE:-}" ]; then
    local args=("$@") base
    base="$(cd "$BASE" && pwd)"
    (cd / && PYTHONPATH="$base:${PYTHONPATH:-}" python3 -c "import srm_hf; assert srm_hf.__file__.startswith('$base/')") || {
      echo "BASE=$BASE holds no srm_hf/: its run would time this checkout" >&2; return 1; }
    PYTHONPATH="$base:${PYTHONPATH:-}" "${args[@]:0:$#-1}" "${args[-1]%.md}_base.md"
  fi
}
case $part in
  tests)
    python3 -m pytest -q -x -p no:cacheprovider tests/test_fused.py tests/test_fused_loss.py tests/test_fused_dictionary.py \
        tests/test_gpu.py -k "not fsdp and not deepspeed" ;;
  large)
    both python3 $B/cost.py --device cuda --bf16 --batch 128 --size 224 --steps 20 --warmup 3 --out "$out/cost_224.md"
    both python3 $B/cost.py --device cuda --bf16 --batch 16 --size 112 --steps 30 --warmup 5 --out "$out/cost_112.md" ;;
  layout)
    python3 $B/cost.py --device cuda --bf16 --batch 128 --size 224 --steps 20 --warmup 3 --channels_last \
        --out "$out/cost_224_nhwc.md"
    python3 $B/cost.py --device cuda --bf16 --batch 16 --size 112 --steps 30 --warmup 5 --channels_last \
        --out "$out/cost_112_nhwc.md"
    python3 $B/graph_step.py --device cuda --bf16 --batch 16 --size 112 --channels_last \
        --out "$out/graph_step_112_nhwc.md" ;;
  small)
    python3 $B/cost.py --device cuda --bf16 --size 28 --batch 64 --teacher resnet18 --student resnet10t --steps 30 \
        --warmup 5 --out "$out/cost_28.md"
    python3 $B/srm_ops.py | tee "$out/srm_ops.txt"
    python3 $B/host_overhead.py --device cuda --bf16 --size 28 --batch 64 --repeats 2 --compile_teacher \
        --no_nan_filter --out "$out/host_overhead_28.md"
    python3 $B/launch_cost.py --device cuda --out "$out/launch_cost.md" ;;
  graphs)
    both python3 $B/graph_step.py --device cuda --bf16 --batch 16 --size 112 --out "$out/graph_step_112.md"
    both python3 $B/graph_step.py --device cuda --bf16 --size 28 --batch 64 --teacher resnet18 --student resnet10t \
        --out "$out/graph_step_28.md" ;;
  pipeline)
    python3 $B/small_model_pipeline.py --workers 8 --repeats 2 --steps 300 --out "$out/small_model_pipeline.md" ;;
  sweep)
    python3 $B/srm_ops.py --sweep | tee "$out/srm_ops_sweep.txt" ;;
  profile)
    for step in "floor: student step + teacher forward" "SRM joint step, fused" "dictionary step, fused" \
                "SRM joint step, fused, kernel projections" "dictionary step, fused, kernel projections" \
                "teacher forward"; do
      python3 $B/cost.py --device cuda --bf16 --batch 128 --size 224 --steps 3 --warmup 3 --profile "$step" \
          > "$out/profile_$(echo "$step" | cut -d: -f1 | tr -c 'a-zA-Z0-9\n' _).txt"
    done ;;
  quality)
    python3 $B/fused_quality.py --cells "ResNet-18 → ResNet-10t, 56 px (14×14 taps)|100" "ResNet-18 → ResNet-10t, 28 px|100" \
        --methods "SRM paper" "SRM joint" --runs "$out/fused_quality_runs.jsonl" --out "$out/fused_quality.md" \
        --work_dir /tmp/fused_quality ;;
  *)
    echo "unknown part $part: tests, large, layout, small, graphs, pipeline, sweep, profile or quality" >&2; exit 2 ;;
esac
