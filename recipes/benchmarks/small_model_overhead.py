"""Small-model overhead on a CUDA GPU: ms per optimizer step of `trainer.train()` for alone, KD and SRM paper on
synthetic in-memory data (no image pipeline), ResNet-10t (8-64) student, ResNet-18 (24-192) teacher, 28 px, batch 64,
bf16; then a raw teacher forward and student step, and CPU/CUDA profiles of 60 KD and alone steps ($OUT/*.txt).

    python recipes/benchmarks/small_model_overhead.py                  # all of it, writes $OUT/overhead.json
    ONLY_TIMES=1 python recipes/benchmarks/small_model_overhead.py     # the step times only, printed
    OLD=1 ONLY_TIMES=1 PYTHONPATH=<checkout of ce49f90> python ...      # the same on the code before the methods
                                                                       # refactor (its method and field names)
"""
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import timm, torch
from srm_hf import DistillationConfig, DistillationTrainer

OUT = os.environ.get("OUT", "/tmp")
FM = {"input_size": [1, 28, 28], "mean": [0.286], "std": [0.353], "crop_pct": 1.0}


class Data(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return {"pixel_values": self.x[i], "labels": self.y[i]}


def models():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=[24, 48, 96, 192], stem_width=24)
    student = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=[8, 16, 32, 64], stem_width=8)
    return teacher, student


def run(method, steps, extra=None, profile=False, **kw):
    teacher, student = models()
    cfg = DistillationConfig(output_dir="/tmp/ov", method=method, max_steps=steps, per_device_train_batch_size=64,
                             bf16=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=50,
                             dataloader_num_workers=kw.pop("workers", 0), **(extra or {}), **kw)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=Data(64 * 400))
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            tr.train()
        return p
    torch.cuda.synchronize(); t = time.perf_counter(); tr.train(); torch.cuda.synchronize()
    return time.perf_counter() - t


res = {}
OLD = os.environ.get("OLD") == "1"
srm = {"dictionary_max_steps": 100, "srm_max_steps": 100} if OLD else {"srm_dictionary_max_steps": 100, "srm_max_steps": 100}
ALONE = "none" if OLD else "alone"
if os.environ.get("ONLY_TIMES") == "1":
    for name, method, extra in [("alone", ALONE, None), ("kd", "kd", None), ("srm_paper", "srm", srm), ("alone", ALONE, None), ("kd", "kd", None), ("srm_paper", "srm", srm)]:
        sec = run(method, 100 if method == "srm" else 300, extra)
        res.setdefault(name, []).append(round(sec / 300 * 1000, 2))
    print("OLD" if OLD else "NEW", res, flush=True)
    sys.exit(0)
for name, method, extra in [("alone", "alone", None), ("kd", "kd", None), ("srm_paper", "srm", srm), ("alone", "alone", None), ("kd", "kd", None)]:
    steps = 100 if method == "srm" else 300
    sec = run(method, steps, extra)
    res.setdefault(name, []).append(round(sec / 300 * 1000, 2))  # ms per step (srm: 300 steps in all)
    print(name, res[name], flush=True)
# ms per step of a teacher forward / student step alone, outside the Trainer
teacher, student = models(); teacher = teacher.cuda().eval(); student = student.cuda()
x = torch.randn(64, 1, 28, 28, device="cuda"); opt = torch.optim.AdamW(student.parameters())
def bench(fn, n=200):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return round((time.perf_counter() - t) / n * 1000, 3)
with torch.autocast("cuda", torch.bfloat16):
    res["raw_teacher_forward_ms"] = bench(lambda: teacher(x))
    def step():
        student(x).float().logsumexp(-1).mean().backward(); opt.step(); opt.zero_grad()
    res["raw_student_step_ms"] = bench(step)
print(res, flush=True)
p = run("kd", 60, profile=True)
table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
open(os.path.join(OUT, "kd_profile.txt"), "w").write(table)
p2 = run("alone", 60, profile=True)
open(os.path.join(OUT, "alone_profile.txt"), "w").write(p2.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
json.dump(res, open(os.path.join(OUT, "overhead.json"), "w"), indent=1)
print(table[:6000])
