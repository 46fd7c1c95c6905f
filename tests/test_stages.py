import pytest
import torch
from conftest import make_config

from srm_hf.methods import SRM, StageSpec
from srm_hf.stages import StagePlan, stage_scheduler, stage_steps

DICTIONARY, SRM_STAGE, KD = SRM().stages()  # paper mode: what each trains and how its schedule runs


def test_plan_positions_and_progress():
    plan = StagePlan([(DICTIONARY, 3), (SRM_STAGE, 2), (KD, 4)])
    assert plan.total_steps == 9
    assert [plan.stage_at(i).name for i in range(10)] == ["dictionary"] * 3 + ["srm"] * 2 + ["kd"] * 5
    assert [plan.stage_at(i).step for i in range(10)] == [0, 1, 2, 0, 1, 0, 1, 2, 3, 3]
    assert [plan.stage_at(i).progress for i in (3, 4, 5, 8)] == [0.5, 1.0, 0.25, 1.0]
    assert str(plan) == "1. dictionary (3 steps) -> 2. srm (2 steps) -> 3. kd (4 steps)"
    with pytest.raises(ValueError, match="positive"):
        StagePlan([(DICTIONARY, 0)])


def test_stage_steps():
    assert stage_steps(StageSpec("srm", epochs=1.5), 10, 99) == 15
    assert stage_steps(StageSpec("srm", epochs=1.5, max_steps=7), 10, 99) == 7
    assert stage_steps(StageSpec("kd"), 10, 99) == 99  # the last stage: the run's own length
    with pytest.raises(ValueError, match="srm"):
        stage_steps(StageSpec("srm", epochs=1.0), None, 99)


@pytest.mark.parametrize("name, kwargs", [("cosine_with_min_lr", {"min_lr": 5e-4}),
                                          ("cosine_warmup_with_min_lr", {"min_lr": 5e-4}),
                                          ("polynomial", {"lr_end": 5e-4})])
def test_absolute_scheduler_kwargs_are_read_against_each_groups_learning_rate(tmp_path, name, kwargs):
    """`min_lr` and `lr_end` are learning rates, not fractions: each group's stage follows the schedule
    transformers gives an optimizer at that group's learning rate, as the Trainer's does."""
    from transformers import get_scheduler

    args = make_config(tmp_path, lr_scheduler_type=name, lr_scheduler_kwargs=kwargs, learning_rate=1e-3)
    groups = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [groups[0]], "stage_group": "student"},
                           {"params": [groups[1]], "stage_group": "heads", "lr": 2e-3}], lr=1e-3)
    sched = stage_scheduler(opt, StagePlan([(SRM_STAGE, 6), (KD, 6)]), args)
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for column, lr, stages in ((0, 1e-3, 2), (1, 2e-3, 1)):
        alone = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        reference = get_scheduler(name, alone, num_warmup_steps=0, num_training_steps=6,
                                  scheduler_specific_kwargs=kwargs)
        want = []
        for _ in range(6):
            want.append(alone.param_groups[0]["lr"])
            alone.step()
            reference.step()
        got = [row[column] for row in lrs]
        assert got[:6] == pytest.approx(want) and min(got[:6]) >= 5e-4 - 1e-12
        assert got[6:] == pytest.approx(want if stages == 2 else [0.0] * 6)


def test_each_group_follows_its_stages_schedule(tmp_path):
    args = make_config(tmp_path, lr_scheduler_type="linear", warmup_steps=1, learning_rate=1.0)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD([
        {"params": [params[0]], "stage_group": "student"},
        {"params": [params[1]], "stage_group": "heads"},
        {"params": [params[2]], "stage_group": "coders", "lr": 0.1},
    ], lr=1.0)
    plan = StagePlan([(DICTIONARY, 2), (SRM_STAGE, 4), (KD, 4)])
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


def test_a_warmup_as_long_as_a_stage_is_named(tmp_path, caplog):
    """Each stage restarts the schedule: warmup_steps=10 meant for a long last stage never lets a 4-step one reach
    its learning rate."""
    import logging

    caplog.set_level(logging.WARNING)
    args = make_config(tmp_path, warmup_steps=10)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "stage_group": "student"}], lr=1e-3)
    stage_scheduler(opt, StagePlan([(SRM_STAGE, 4), (KD, 20)]), args)
    assert any("warms stage 'srm' up over 10 steps of its 4" in r.message for r in caplog.records)
    assert not any("stage 'kd'" in r.message for r in caplog.records)
