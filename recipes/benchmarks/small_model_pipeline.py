"""Small-model overhead on a CUDA GPU with the real image pipeline: ms per optimizer step of alone, KD and SRM paper
(Fashion-MNIST IDX files, 1,000 img/class, ImageTransform with random crop + flip), the shipped teacher, ResNet-10t
(8-64) student, batch 64, bf16, with 8 and 0 loader workers; printed.

    FASHION_MNIST_DIR=path/to/idx python recipes/benchmarks/small_model_pipeline.py   # from the repository root
"""
import os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import timm, torch
from srm_hf import DistillationConfig, DistillationTrainer
from srm_hf.data import DataArguments, load_image_splits
from srm_hf.transforms import ImageTransform, preprocessing_for

from srm_hf.data import DEBIAN_FASHION_MNIST  # noqa: E402

data_dir = os.environ.get("FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST)
splits = load_image_splits(DataArguments(dataset_dir=data_dir, max_train_samples_per_class=1000))
FM = {"input_size": [1, 28, 28], "test_input_size": [1, 28, 28], "mean": [0.286], "std": [0.353], "crop_pct": 1.0,
      "interpolation": "bilinear"}
res = {}
for workers in (8, 0):
    for method in ("alone", "kd", "srm", "alone", "kd"):
        torch.manual_seed(0)
        teacher = timm.create_model("local-dir:recipes/teachers/fashion_mnist_resnet18", pretrained=True)
        student = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=[8, 16, 32, 64], stem_width=8,
                                    pretrained_cfg_overlay=FM)
        train = splits.train.with_transform(ImageTransform(preprocessing_for(student), train=True))
        extra = {"srm_dictionary_max_steps": 100, "srm_max_steps": 100} if method == "srm" else {}
        cfg = DistillationConfig(output_dir="/tmp/pl", method=method, max_steps=100 if method == "srm" else 300,
                                 per_device_train_batch_size=64, bf16=True, report_to="none", save_strategy="no",
                                 disable_tqdm=True, logging_steps=100, dataloader_num_workers=workers, **extra)
        tr = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=train)
        torch.cuda.synchronize(); t = time.perf_counter(); tr.train(); torch.cuda.synchronize()
        res.setdefault(f"workers{workers}/{method}", []).append(round((time.perf_counter() - t) / 300 * 1000, 2))
        print(res, flush=True)
