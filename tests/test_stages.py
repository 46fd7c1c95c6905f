import pytest
import torch
from conftest import make_config

from srm_hf.stages import StagePlan, stage_scheduler, stage_steps


def test_plan_positions():
    plan = StagePlan([("dictionary", 3), ("srm", 2), ("kd", 4)])
    assert plan.total_steps == 9
    assert [plan.stage_at(i).name for i in range(10)] == ["dictionary"] * 3 + ["srm"] * 2 + ["kd"] * 5
    assert str(plan) == "1. dictionary (3 steps) -> 2. srm (2 steps) -> 3. kd (4 steps)"
    with pytest.raises(ValueError, match="positive"):
        StagePlan([("dictionary", 0)])


def test_stage_steps():
    assert stage_steps(1.5, -1, 10, "srm") == 15
    assert stage_steps(1.5, 7, 10, "srm") == 7
    with pytest.raises(ValueError, match="srm"):
        stage_steps(1.0, -1, None, "srm")


def test_each_group_follows_its_stages_schedule(tmp_path):
    args = make_config(tmp_path, lr_scheduler_type="linear", warmup_steps=1, learning_rate=1.0)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD([
        {"params": [params[0]], "srm_group": "student"},
        {"params": [params[1]], "srm_group": "heads"},
        {"params": [params[2]], "srm_group": "dictionary", "lr": 0.1},
    ], lr=1.0)
    plan = StagePlan([("dictionary", 2), ("srm", 4), ("kd", 4)])
    sched = stage_scheduler(opt, plan, args)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    student, heads, dictionary = zip(*lrs)
    # dictionary: constant in stage 1, zero after; student/heads: warmup then linear decay, restarted per stage
    assert dictionary == pytest.approx([0.1, 0.1] + [0.0] * 8)
    assert student == pytest.approx([0, 0, 0.0, 1.0, 2 / 3, 1 / 3, 0.0, 1.0, 2 / 3, 1 / 3])
    assert heads == pytest.approx([0, 0, 0.0, 1.0, 2 / 3, 1 / 3, 0, 0, 0, 0])
    assert set(sched.state_dict()) >= {"last_epoch"}
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    torch.load(tmp_path / "s.pt", weights_only=True)  # what the Trainer does on resume
