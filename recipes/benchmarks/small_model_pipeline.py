"""Small-model overhead on a CUDA GPU with the real image pipeline: wall time per optimizer step of the student alone,
KD and SRM paper (Fashion-MNIST IDX files, 1,000 img/class, ImageTransform with random crop + flip), the shipped
teacher, ResNet-10t (8-64) student, batch 64, bf16, with 8 and 0 loader workers. KD also runs with the teacher
compiled (`compile_teacher`, mode 'reduce-overhead': CUDA graphs), SRM with the eager maths and with the fused
kernels (`srm_kernels`).

    FASHION_MNIST_DIR=path/to/idx python recipes/benchmarks/small_model_pipeline.py --out /tmp/pipeline.md
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from bench_report import write_report  # noqa: E402

from srm_hf import DistillationConfig, DistillationTrainer  # noqa: E402
from srm_hf.data import DEBIAN_FASHION_MNIST, DataArguments, load_image_splits  # noqa: E402
from srm_hf.transforms import ImageTransform, preprocessing_for  # noqa: E402

FM = {"input_size": [1, 28, 28], "test_input_size": [1, 28, 28], "mean": [0.286], "std": [0.353], "crop_pct": 1.0,
      "interpolation": "bilinear"}
VARIANTS = {  # name -> (method, extra config); SRM paper runs its three stages a third of the steps each
    "alone": ("alone", {}),
    "kd": ("kd", {}),
    "kd, compiled teacher": ("kd", {"compile_teacher": True, "torch_compile_mode": "reduce-overhead"}),
    "srm paper, eager": ("srm", {"srm_kernels": "eager"}),
    "srm paper, fused": ("srm", {"srm_kernels": "triton"}),
}


def ms_per_step(splits, method, extra, workers, steps=300):
    torch.manual_seed(0)
    teacher = timm.create_model("local-dir:recipes/teachers/fashion_mnist_resnet18", pretrained=True)
    student = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=[8, 16, 32, 64], stem_width=8,
                                pretrained_cfg_overlay=FM)
    train = splits.train.with_transform(ImageTransform(preprocessing_for(student), train=True))
    max_steps = steps
    if method == "srm":  # dictionary, SRM and KD stages: as many passes as the other runs in all
        max_steps = steps // 3
        extra = {**extra, "srm_dictionary_max_steps": max_steps, "srm_max_steps": max_steps}
    cfg = DistillationConfig(output_dir="/tmp/small_model_pipeline", method=method, max_steps=max_steps,
                             per_device_train_batch_size=64, bf16=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, logging_steps=100, dataloader_num_workers=workers, **extra)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=train)
    torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[8, 0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="Optimizer steps per run (SRM paper: a third per stage).")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="small_model_pipeline.md")
    args = p.parse_args()
    data_dir = os.environ.get("FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST)
    splits = load_image_splits(DataArguments(dataset_dir=data_dir, max_train_samples_per_class=1000))
    lines = [f"# Small models on {torch.cuda.get_device_name()}: ms per optimizer step, whole `trainer.train()`",
             "", "Median over repeats (run in turn); the ratio is to the student alone with the same loader workers.",
             "", "| workers | run | ms / step | × alone | repeats |", "|---|---|---|---|---|"]
    for workers in args.workers:
        times = {name: [] for name in ["alone", *args.variants] if name in VARIANTS}
        for _ in range(args.repeats):
            for name in times:
                method, extra = VARIANTS[name]
                times[name].append(ms_per_step(splits, method, extra, workers, args.steps))
                print(workers, name, round(times[name][-1], 2), flush=True)
        alone = statistics.median(times["alone"])
        for name, ms in times.items():
            lines.append(f"| {workers} | {name} | {statistics.median(ms):.2f} | {statistics.median(ms) / alone:.2f} | "
                         f"{', '.join(f'{t:.2f}' for t in ms)} |")
    write_report(args.out, lines, "small_model_pipeline.py")


if __name__ == "__main__":
    main()
