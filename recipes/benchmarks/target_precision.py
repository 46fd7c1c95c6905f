"""Would SRM's targets survive the autocast dtype? Teacher targets from a bf16 projection against float32.

srm_hf computes the teacher's targets in float32 whatever precision the teacher runs in (`SRM.targets`). A bf16
projection a = Dᵀt + b would read and write half the bytes; this measures what it would change, on the shipped
Fashion-MNIST teacher's real features with a trained dictionary:

  1. the dictionary stage of `srm_mode="paper"` trains on `--images_per_class` training images per class;
  2. on `--eval_images` held-out validation images, the targets of every tap are computed twice: from a in float32,
     and from a computed in bf16 (features and dictionary rounded to bf16, products summed in float32, a rounded
     to bf16: what a bf16 1×1 convolution under autocast gives);
  3. per tap: the share of pixel labels that differ, how many of those sit at an exact tie in bf16 (the two largest
     values of a, or of the kept codes, equal after rounding, so the lowest atom index wins), and the image-label
     differences.

    python recipes/benchmarks/target_precision.py        # CPU, writes results/target_precision.md
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # recipes/

from offline import go_offline_if_hub_unreachable  # noqa: E402

go_offline_if_hub_unreachable()

import torch  # noqa: E402
from distill import SHIPPED_TEACHER  # noqa: E402
from quality import Preprocessed, student_model  # noqa: E402
from transformers import set_seed  # noqa: E402

from bench_report import write_report  # noqa: E402

from srm_hf import DistillationConfig, DistillationTrainer  # noqa: E402
from srm_hf.data import DataArguments, load_image_splits, stratified_subset  # noqa: E402
from srm_hf.loading import load_image_classifier  # noqa: E402
from srm_hf.srm import channel_dim, project, srm_targets, top_k_mask  # noqa: E402
from srm_hf.transforms import preprocessing_for  # noqa: E402


@torch.no_grad()
def compare(coder, feature: torch.Tensor) -> dict:
    """Targets of one tap from a in float32 and from a in bf16 (products summed in float32, as a bf16 convolution
    does), compared."""
    k = coder.num_active
    a32 = project(feature.float(), coder.dictionary, coder.bias)
    a16 = project(feature.bfloat16(), coder.dictionary.bfloat16(), coder.bias.bfloat16())
    dim = channel_dim(a16)
    pixel32, image32 = srm_targets(torch.sigmoid(a32) * top_k_mask(a32, k, dim))
    codes16 = torch.sigmoid(a16.float()) * top_k_mask(a16, k, dim)
    pixel16, image16 = srm_targets(codes16)
    a_top2, code_top2 = a16.float().topk(2, dim=dim).values, codes16.topk(2, dim=dim).values
    tie = (a_top2.select(dim, 0) == a_top2.select(dim, 1)) | (code_top2.select(dim, 0) == code_top2.select(dim, 1))
    differ = pixel16 != pixel32
    return {"pixels": differ.numel(), "differ": int(differ.sum()), "differ_at_ties": int((differ & tie).sum()),
            "ties": int(tie.sum()), "image_max_diff": float((image16 - image32).abs().max()),
            "image_mean_diff": float((image16 - image32).abs().mean()), "k": k, "K": coder.num_atoms,
            "grid": "x".join(map(str, feature.shape[2:])) if feature.dim() == 4 else "vector"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images_per_class", type=int, default=1000)
    parser.add_argument("--dictionary_steps", type=int, default=300)
    parser.add_argument("--eval_images", type=int, default=2000)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "target_precision.md"))
    args = parser.parse_args(argv)
    set_seed(0)
    splits = load_image_splits(DataArguments(max_train_samples_per_class=args.images_per_class))
    teacher = load_image_classifier(SHIPPED_TEACHER)
    student = student_model(28)
    train = Preprocessed(splits.train, preprocessing_for(teacher))
    held_out = Preprocessed(stratified_subset(splits.validation, args.eval_images // 10, seed=0),
                            preprocessing_for(teacher))
    config = DistillationConfig(output_dir="/tmp/target_precision", method="srm", srm_mode="paper",
                                srm_dictionary_max_steps=args.dictionary_steps, srm_max_steps=1, max_steps=1,
                                per_device_train_batch_size=64, learning_rate=0.003, report_to="none",
                                save_strategy="no", disable_tqdm=True, logging_steps=100, use_cpu=True, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train)
    trainer.train_stages(["dictionary"])
    features = trainer.teacher_forward({"pixel_values": held_out.x}).features  # every held-out image at once
    rows = {key: compare(trainer.method.coders[key], feature) for key, feature in features.items()}

    lines = ["# Teacher targets from a bf16 projection against float32", "",
             f"Shipped teacher ({SHIPPED_TEACHER}), taps paired with ResNet-10t at 28 px; dictionary stage of "
             f"`srm_mode=\"paper\"` trained {args.dictionary_steps} steps (batch 64) on {args.images_per_class} "
             f"training images per class; targets of {len(held_out)} held-out validation images.", "",
             "| tap | grid | K, k | pixel labels that differ | of which exact bf16 ties | pixels at a bf16 tie | "
             "largest / mean image-label difference |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['grid']} | {r['K']}, {r['k']} | {r['differ']} of {r['pixels']} "
                     f"({100 * r['differ'] / r['pixels']:.2f} %) | {r['differ_at_ties']} | {r['ties']} | "
                     f"{r['image_max_diff']:.2e} / {r['image_mean_diff']:.2e} |")
    write_report(args.out, lines, "target_precision.py", argv)


if __name__ == "__main__":
    main()
