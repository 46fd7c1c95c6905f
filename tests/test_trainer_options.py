"""Standard TrainingArguments options and Trainer features with the distillation stages: they work, or are refused
with an error that says what to do."""

import logging
import math

import pytest
import torch
from conftest import (PatternDataset, changed, hf_resnet, make_config, make_trainer, parallelism_config, snapshot,
                      timm_resnet)
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, TrainerCallback

from srm_hf import DistillationTrainer, Features
from srm_hf.methods import KD, Alone
from srm_hf.metrics import make_compute_metrics
from srm_hf.stages import StagePlan


def smoothed_ce_by_hand(logits: list[float], label: int, eps: float) -> float:
    lse = math.log(sum(math.exp(z) for z in logits))
    log_p = [z - lse for z in logits]
    return (1 - eps) * -log_p[label] + eps * -sum(log_p) / len(logits)


def test_label_smoothing_reaches_every_cross_entropy_with_labels(tmp_path):
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]), torch.tensor([0, 2])
    expected = sum(smoothed_ce_by_hand(row, y, 0.3) for row, y in zip(logits.tolist(), labels.tolist())) / 2
    trainer = make_trainer(tmp_path, method="alone", label_smoothing_factor=0.3, max_steps=1)  # used to crash
    assert trainer.method.label_smoothing == 0.3
    stage = StagePlan([(trainer.method.stages()[0], 1)]).stage_at(0)
    assert trainer.method.loss(stage, Features(logits), None, labels)["ce"].item() == pytest.approx(expected, rel=1e-6)
    kd = KD(alpha=0.25)
    kd.label_smoothing = 0.3
    terms = kd.loss(stage, Features(logits), Features(logits.flip(1)), labels)
    assert terms["ce"].item() == pytest.approx(0.75 * expected, rel=1e-6)
    assert Alone().loss(stage, Features(logits), None, labels)["ce"].item() != pytest.approx(expected)  # ε = 0
    trainer.train()  # and the run goes through


def test_compute_loss_func_is_refused_with_the_way_to_do_it(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func is not supported.*srm_hf.Method"):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=make_config(tmp_path),
                            train_dataset=PatternDataset(8), compute_loss_func=lambda *a, **k: 0)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=4))


@pytest.mark.parametrize("student", ["timm", "transformers"])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, student):
    config = {"method": "kd"} if student == "timm" else {"srm_mode": "joint", "srm_dictionary_max_steps": 1,
                                                         "layer_pairs": ["layer2:vit.layers.0"]}

    def losses(checkpointing):
        model = timm_resnet(seed=1) if student == "timm" else tiny_vit()
        trainer = make_trainer(tmp_path / str(checkpointing), student=model, max_steps=3, **config,
                               gradient_checkpointing=checkpointing)
        trainer.train()
        model = trainer.distill_model.student
        assert (model.grad_checkpointing if student == "timm" else model.is_gradient_checkpointing) == checkpointing
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    with_checkpoints, without = losses(True), losses(False)
    assert len(with_checkpoints) >= 3 and with_checkpoints == pytest.approx(without, rel=1e-5)


def test_timm_checkpointing_of_tapped_stages_says_what_to_tap(tmp_path):
    trainer = make_trainer(tmp_path, student=timm_resnet(seed=1), gradient_checkpointing=True)
    with pytest.raises(RuntimeError, match="timm's gradient checkpointing.*tap blocks inside it"):
        trainer.train()


def test_options_for_timms_checkpointing_which_takes_none_are_refused(tmp_path):
    trainer = make_trainer(tmp_path, student=timm_resnet(seed=1), method="kd", gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"preserve_rng_state": False})
    with pytest.raises(ValueError, match="\\{'preserve_rng_state': False\\}: timm's checkpointing.*takes no options"):
        trainer.train()


def test_gradient_checkpointing_needs_a_student_that_has_it(tmp_path):
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 4))
    trainer = make_trainer(tmp_path, student=student, method="kd", gradient_checkpointing=True)
    with pytest.raises(ValueError, match="checkpointing is on.*Sequential.*turn it off"):
        trainer.train()


def test_early_stopping_and_best_model_act_in_the_final_stage_only(tmp_path):
    # 4 dictionary + 4 SRM + 4 KD steps, evaluated after every step, patience 1: evaluations before KD would judge
    # a student whose classifier is untrained, and stop the run inside SRM's first stages.
    trainer = make_trainer(tmp_path, callbacks=[EarlyStoppingCallback(early_stopping_patience=1)],
                           eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                           load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    trainer.train()
    evaluated = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert evaluated and min(evaluated) >= 9  # the KD stage runs steps 9-12
    assert all(e["stage"] == 3 for e in trainer.state.log_history if "eval_loss" in e)
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert 9 <= best <= 12


def test_epoch_evaluation_waits_for_the_final_stage(tmp_path):
    # 32 images, batch 8: one epoch of dictionary (steps 1-4), one of SRM (5-8), two of KD (9-16).
    trainer = make_trainer(tmp_path, eval_strategy="epoch", max_steps=-1, num_train_epochs=2,
                           srm_dictionary_epochs=1, srm_epochs=1, srm_dictionary_max_steps=-1, srm_max_steps=-1)
    trainer.train()
    evaluated = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert evaluated == [12, 16]


def test_epoch_evaluation_counts_the_final_stage_passes_and_eval_delay_in_trainer_epochs(tmp_path):
    # 1.5 epochs of dictionary (steps 1-6), one of SRM (7-10), two of KD (11-18): the KD passes end at 14 and 18,
    # not at the Trainer's epoch ends (12, 16). eval_delay counts Trainer epochs, as in the Trainer (14 is epoch 3.5).
    common = dict(eval_strategy="epoch", max_steps=-1, num_train_epochs=2, srm_dictionary_epochs=1.5, srm_epochs=1,
                  srm_dictionary_max_steps=-1, srm_max_steps=-1)
    trainer = make_trainer(tmp_path / "a", **common)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [14, 18]
    delayed = make_trainer(tmp_path / "b", eval_delay=4, **common)
    delayed.train()
    assert [e["step"] for e in delayed.state.log_history if "eval_loss" in e] == [18]
    # logs follow the stages' passes too: the dictionary's 1.5 epochs end at 6, SRM's at 10, KD's at 14 and 18
    logged = make_trainer(tmp_path / "c", **{**common, "eval_strategy": "no"}, logging_strategy="epoch")
    logged.train()
    assert [e["step"] for e in logged.state.log_history if "loss" in e] == [4, 6, 10, 14, 18]


def test_stages_run_alone_are_never_judged_stopped_or_rolled_back(tmp_path):
    # train_stages(["dictionary"]) runs a plan whose last stage is not the method's final one: evaluating there
    # would score an unchanged student, and best-model selection would put back the dictionary of the first step.
    trainer = make_trainer(tmp_path, callbacks=[EarlyStoppingCallback(early_stopping_patience=1)],
                           eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                           load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    trainer.train_stages(["dictionary"])
    assert trainer.state.global_step == 4 and not any("eval_loss" in e for e in trainer.state.log_history)
    assert trainer.state.best_model_checkpoint is None
    last = load_file(str(tmp_path / "out" / "checkpoint-4" / "method_state.safetensors"))
    for k, v in trainer.distill_model.state_dict().items():
        if k.startswith("method.coders."):
            torch.testing.assert_close(v, last[k])


def test_a_log_window_ends_with_its_stage(tmp_path):
    # logging_steps=3 over 4 dictionary + 4 SRM + 4 KD steps: the stage ends (4, 8) are logged too, so no logged
    # loss averages two stages' losses.
    trainer = make_trainer(tmp_path, logging_steps=3)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [3, 4, 6, 8, 9, 12]
    names = {1: "dictionary", 2: "srm", 3: "kd"}
    for e in logs:
        assert {k.split("/")[0] for k in e if "/" in k} == {names[e["stage"]]}


def test_logged_terms_belong_to_their_run_and_are_not_kept_when_nothing_is_logged(tmp_path):
    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # inside SRM's stage 2, between two logs
                raise KeyboardInterrupt

    trainer = make_trainer(tmp_path, logging_steps=4, callbacks=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.remove_callback(Interrupt)
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)  # the new run's dictionary stage
    assert first["stage"] == 1 and not any(k.startswith("srm/") for k in first)
    silent = make_trainer(tmp_path / "silent", logging_strategy="no")
    silent.train()
    assert not silent.logged.values and not any("loss" in e for e in silent.state.log_history)
    trainer.evaluate(metric_key_prefix="test")
    assert trainer.state.log_history[-1]["stage"] == 3  # any evaluation prefix, not only eval_


def test_a_schedule_other_than_the_stages_is_refused_before_the_first_step(tmp_path):
    student = hf_resnet()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizers=.*StepLR.*optimizers=\\(optimizer, None\\)"):
        make_trainer(tmp_path, student=student, optimizers=(optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1)))
    with pytest.raises(ValueError, match="lack the 'stage_group' tag"):  # when the trainer is built, not at step 1
        make_trainer(tmp_path, student=student, optimizers=(optimizer, None))

    class Cosine(DistillationTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            self.lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, num_training_steps)
            return self.lr_scheduler

    trainer = make_trainer(tmp_path, cls=Cosine)
    with pytest.raises(ValueError, match="CosineAnnealingLR, not the stage schedule.*stage_scheduler"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_an_optimizer_passed_in_without_the_methods_modules_is_refused_before_the_first_step(tmp_path):
    student = hf_resnet()
    optimizer = torch.optim.AdamW([{"params": list(student.parameters()), "stage_group": "student"}], lr=1e-3)
    trainer = make_trainer(tmp_path, student=student, optimizers=(optimizer, None))
    before = snapshot(trainer.distill_model)
    with pytest.raises(ValueError, match="Stage 'dictionary' trains 'coders', but the optimizer lacks 8 of its "
                                         "parameters \\(e.g. 'method.coders.layer1.dictionary'\\)"
                                         ".*param_groups.*optimizer_cls_and_kwargs"):
        trainer.train()
    assert trainer.state.global_step == 0 and not changed(before, snapshot(trainer.distill_model))
    class OwnSchedule(DistillationTrainer):  # an override that builds the stage schedule itself: still checked
        def create_scheduler(self, num_training_steps, optimizer=None):
            from srm_hf.stages import stage_scheduler

            self.lr_scheduler = stage_scheduler(self.optimizer, self.plan, self.args)
            return self.lr_scheduler

    optimizer = torch.optim.AdamW([{"params": list(student.parameters()), "stage_group": "student"}], lr=1e-3)
    trainer = make_trainer(tmp_path, student=student, optimizers=(optimizer, None), cls=OwnSchedule)
    with pytest.raises(ValueError, match="Stage 'dictionary' trains 'coders', but the optimizer lacks"):
        trainer.train()
    assert trainer.state.global_step == 0
    groups = trainer.distill_model.param_groups(set(), 0.0)  # the way the error names: every module, trained
    trainer = make_trainer(tmp_path, student=student, optimizers=(torch.optim.AdamW(groups, lr=1e-3), None),
                           method="kd")
    trainer.train()


@pytest.mark.parametrize("spec, match", [
    (dict(trains="student"), "trains='student' must be a non-empty tuple of names.*trains=\\('student',\\)"),
    (dict(trains=()), "trains=\\(\\) must be a non-empty tuple"),
    (dict(epochs=0), "epochs=0 must be > 0.*leave the stage out"),
])
def test_a_stage_spec_that_cannot_run_as_meant_is_refused_when_written(spec, match):
    from srm_hf import StageSpec

    with pytest.raises(ValueError, match=f"StageSpec 'warm': {match}"):
        StageSpec("warm", **spec)
    StageSpec("warm", trains=["student"], epochs=0, max_steps=2)  # max_steps overrides the epochs


@pytest.mark.parametrize("options, match", [
    (dict(auto_find_batch_size=True), "auto_find_batch_size.*per_device_train_batch_size"),
    (dict(label_names=["target"]), "label_names.*'labels'"),
    (dict(neftune_noise_alpha=5.0), "neftune_noise_alpha.*leave it unset"),
    (dict(use_liger_kernel=True), "use_liger_kernel.*leave it unset"),
    (dict(optim="galore_adamw"), "optim=galore_adamw.*another optim"),
    (dict(enable_jit_checkpoint=True), "enable_jit_checkpoint.*save_steps"),
    (dict(push_to_hub=True, hub_model_id="user/student", hub_strategy="checkpoint"), "hub_strategy=checkpoint"),
    (dict(stage_batch_sizes={"dictionary": 16}, logging_strategy="epoch"), "logging_strategy='epoch'.*'steps'"),
    (dict(stage_batch_sizes={"dictionary": 16}, eval_delay=2), "eval_delay=2.*eval_delay=0"),
    (dict(stage_batch_sizes={"dictionary": 16}, ignore_data_skip=True), "ignore_data_skip.*False"),
    (dict(train_sampling_strategy="group_by_length"), "group_by_length.*'random'"),
    (dict(train_sampling_strategy="batch_rebalance"), "batch_rebalance.*'random'"),
    (dict(stage_batch_sizes={"dictionary": 16}, train_sampling_strategy="batch_rebalance"), "batch_rebalance"),
    (dict(stage_batch_sizes={"dictionary": 16}, accelerator_config={"split_batches": True}), "split_batches.*per dev"),
    (dict(bf16_full_eval=True), "bf16_full_eval.*bf16=True"),
    (dict(fp16_full_eval=True), "fp16_full_eval.*fp16=True"),
    (dict(liger_kernel_config={"rope": False}), "liger_kernel_config.*leave it unset"),
    (dict(optim_target_modules="all-linear"), "optim_target_modules='all-linear'.*Leave it unset"),
    (dict(length_column_name="n_pixels"), "length_column_name='n_pixels'.*group_by_length.*Leave it unset"),
    *([(dict(parallelism_config=parallelism_config()), "parallelism_config.*multi_gpu.yaml")]
      if parallelism_config() is not None else []),  # accelerate before 1.10: no such option
    (dict(optim="schedule_free_adamw"), "optim=schedule_free_adamw.*another optim"),
    (dict(preset="reference", eval_strategy="epoch", optim="sgd"), "reference.*not optim=sgd"),
    (dict(preset="reference", eval_strategy="epoch", optim_args="momentum=0.9"), "reference.*optim_args"),
    (dict(preset="reference", eval_strategy="epoch", max_grad_norm=5.0), "does not clip.*max_grad_norm=5.0"),
])
def test_options_the_stages_cannot_honour_are_refused_when_the_config_is_built(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **options)


@pytest.mark.parametrize("option", [dict(ddp_find_unused_parameters=False), dict(ddp_static_graph=True)])
def test_ddps_one_graph_options_are_judged_on_the_method_the_trainer_runs(tmp_path, option):
    """DDP told every parameter gets a gradient at every step (or that the graph never changes) fails in the
    middle of a plan whose stages train other modules; a one-stage method keeps the faster option."""
    args = make_config(tmp_path, method="kd", **option)  # the config's method: not the one that runs
    with pytest.raises(ValueError, match="method 'srm' trains other modules.*dictionary, srm, kd"):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=args, method="srm",
                            train_dataset=PatternDataset(8))
    two_stages = make_config(tmp_path, method="fitnet", **option)  # KD passed to the trainer: one stage, fine
    DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=two_stages, method=KD(),
                        train_dataset=PatternDataset(8))


def test_remove_unused_columns_is_refused_only_where_it_drops_what_a_transform_reads(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"raw": [[float(i)] * 3 * 32 * 32 for i in range(8)], "label": [0, 1, 2, 3] * 2})

    def to_pixels(batch):
        return {"pixel_values": [torch.tensor(r).view(3, 32, 32) for r in batch["raw"]], "labels": batch["label"]}

    with pytest.raises(ValueError, match="remove_unused_columns=True with a dataset transformed on the fly"):
        make_trainer(tmp_path, remove_unused_columns=True, train_dataset=rows.with_transform(to_pixels))
    stored = datasets.Dataset.from_dict({"pixel_values": [PatternDataset(8)[i]["pixel_values"].tolist()
                                                          for i in range(8)], "labels": [0, 1, 2, 3] * 2})
    trainer = make_trainer(tmp_path, method="kd", max_steps=1, remove_unused_columns=True, train_dataset=stored)
    trainer.train()  # nothing computed on the fly: the Trainer's column removal is harmless, and kept


def test_selecting_on_a_metric_nothing_computes_is_refused_before_training(tmp_path):
    """Evaluation waits for the final stage: the Trainer's own KeyError came after the earlier stages had trained."""
    best = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match="metric_for_best_model='accuracy'.*compute_metrics.*'eval_loss'"):
        make_trainer(tmp_path, metric_for_best_model="accuracy", **best)
    make_trainer(tmp_path, metric_for_best_model="eval_loss", greater_is_better=False, **best)  # computed: accepted
    from srm_hf.metrics import make_compute_metrics

    def trainer(eval_dataset, **config):
        return DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=make_config(tmp_path, **config),
                                   train_dataset=PatternDataset(8), eval_dataset=eval_dataset,
                                   compute_metrics=make_compute_metrics())

    with pytest.raises(ValueError, match="'accuracy' with prediction_loss_only=True: evaluation then computes"):
        trainer(PatternDataset(4), metric_for_best_model="accuracy", prediction_loss_only=True, **best)
    sets = {"val": PatternDataset(4), "test": PatternDataset(4, seed=1)}
    with pytest.raises(ValueError, match="'loss' with eval_dataset of several sets \\(val, test\\).*"
                                         "metric_for_best_model='val_loss'"):
        trainer(sets, **best)  # load_best_model_at_end selects on 'loss' by default
    trainer(sets, metric_for_best_model="test_accuracy", **best)


def test_the_reference_preset_still_rebuilds_for_another_method(tmp_path):
    args = make_config(tmp_path, preset="reference", eval_strategy="epoch")  # max_grad_norm 0.0 after the preset
    assert args.for_method("kd").max_grad_norm == 0.0


def test_optimizer_cls_and_kwargs_builds_the_stage_groups_optimizer(tmp_path):
    def trainer(**config):
        return DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=make_config(tmp_path, **config),
                                   train_dataset=PatternDataset(32),
                                   optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}))

    optimizer = trainer(method="kd").create_optimizer()
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert all("stage_group" in g for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="reference.*optimizer_cls_and_kwargs"):
        trainer(preset="reference", eval_strategy="epoch")


def test_a_passed_optimizer_gets_a_schedule_for_each_new_plan(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, srm_dictionary_max_steps=2, srm_max_steps=2)
    trainer.optimizer = torch.optim.SGD(trainer.distill_model.param_groups(set(), 0.0), lr=0.1)  # tagged groups
    trainer.train_stages(["dictionary"])
    trainer.train()  # SRM and KD: a schedule sized for this plan, not the dictionary's
    rates = [e["learning_rate"] for e in trainer.state.log_history if e.get("stage") == 2 and "loss" in e]
    assert rates and all(r > 0 for r in rates)


def test_a_model_only_checkpoint_is_refused_for_resuming(tmp_path):
    trainer = make_trainer(tmp_path, method="kd", save_strategy="steps", save_steps=2, save_only_model=True)
    trainer.train()
    with pytest.raises(ValueError, match="save_only_model=True.*no optimizer"):
        make_trainer(tmp_path, method="kd").train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="save_only_model=True"):
        make_trainer(tmp_path, method="kd").train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_resuming_under_another_stage_plan_or_at_its_end_is_refused(tmp_path):
    plan = dict(srm_dictionary_max_steps=2, srm_max_steps=2, save_strategy="steps", save_steps=2)  # 2 + 2 + 4 steps
    make_trainer(tmp_path, **plan).train()
    mid_srm = str(tmp_path / "out" / "checkpoint-4")
    with pytest.raises(ValueError, match=r"dictionary \(2 steps\) -> srm \(2 steps\).*this run's is dictionary "
                                         r"\(1 steps\).*its step 4 would resume in another stage"):
        make_trainer(tmp_path, **{**plan, "srm_dictionary_max_steps": 1}).train(resume_from_checkpoint=mid_srm)
    with pytest.raises(ValueError, match="checkpoint-8 is at step 8, the end of this run's plan.*nothing is left"):
        make_trainer(tmp_path, **plan).train(resume_from_checkpoint=True)
    longer = make_trainer(tmp_path, **plan, max_steps=6)  # only the last stage changes length: resumed
    longer.train(resume_from_checkpoint=True)
    assert longer.state.global_step == 10 and longer.state.log_history[-2]["stage"] == 3


def test_train_stages_after_a_whole_train_runs_a_later_stage_again(tmp_path):
    trainer = make_trainer(tmp_path, srm_dictionary_max_steps=2, srm_max_steps=2, max_steps=2)
    trainer.train()
    trainer.train_stages(["kd"])  # the stages it builds on have run in train()
    assert trainer.plan.describe() == [["kd", 2]] and trainer.state.global_step == 2
    with pytest.raises(ValueError, match="would run before stage \\['dictionary', 'srm'\\]"):
        make_trainer(tmp_path / "new").train_stages(["kd"])


def test_the_stages_after_train_stages_resume_with_train_stages(tmp_path):
    plan = dict(srm_dictionary_max_steps=2, srm_max_steps=2, save_strategy="steps", save_steps=2)
    trainer = make_trainer(tmp_path, **plan)
    trainer.train_stages(["dictionary"])  # checkpoint-2 under the plan dictionary (2)
    trainer.train()  # checkpoint-2 .. -6 under srm (2) -> kd (4): checkpoint-2 rewritten
    with pytest.raises(ValueError, match="resumes with `train_stages\\(\\)` of the stages that followed"):
        make_trainer(tmp_path, **plan).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    resumed = make_trainer(tmp_path, **plan)
    resumed.train_stages(["srm", "kd"], resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 6


def test_a_checkpoint_at_the_end_of_train_stages_goes_on_with_train_in_a_new_trainer(tmp_path):
    """The dictionary learnt by `train_stages(["dictionary"])` in an earlier process: `train()` resumes its last
    checkpoint into the stages after it, as an uninterrupted `train()` would have gone on."""
    plan = dict(srm_dictionary_max_steps=4, srm_max_steps=2, max_steps=2)
    full = make_trainer(tmp_path / "full", **plan)
    full.train()
    first = make_trainer(tmp_path, save_strategy="steps", save_steps=2, **plan)
    first.train_stages(["dictionary"])  # checkpoint-2, checkpoint-4 under the plan dictionary (4)
    ended = str(tmp_path / "out" / "checkpoint-4")
    with pytest.raises(ValueError, match="written at the end of `train_stages\(\)`, with `train\(\)`"):
        make_trainer(tmp_path, **plan).train_stages(["srm", "kd"], resume_from_checkpoint=ended)
    with pytest.raises(ValueError, match="lengthen the last stage \('dictionary'\).*train\(resume_from_checkpoint"):
        make_trainer(tmp_path, **plan).train_stages(["dictionary"], resume_from_checkpoint=ended)
    went_on = make_trainer(tmp_path, **plan)
    went_on.train(resume_from_checkpoint=ended)
    assert went_on.state.global_step == 8 and went_on.method.dictionary_learnt
    assert [e["stage"] for e in went_on.state.log_history if "loss" in e][-4:] == [2, 2, 3, 3]
    a, b = full.distill_model.state_dict(), went_on.distill_model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resuming_the_newest_checkpoint_means_the_one_written_last(tmp_path):
    """`train()` after `train_stages()` counts steps from 0 again: its interrupted run's checkpoint-2 is newer than
    the dictionary's checkpoint-4, and is the one `resume_from_checkpoint=True` takes."""
    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("crash")

    plan = dict(srm_dictionary_max_steps=4, srm_max_steps=4, save_strategy="steps", save_steps=2)
    first = make_trainer(tmp_path, **plan)
    first.train_stages(["dictionary"])  # checkpoint-2, -4: dictionary (4)
    first.add_callback(Crash())
    with pytest.raises(KeyboardInterrupt):
        first.train()  # srm (4) -> kd (4): checkpoint-2 written again, then the crash
    resumed = make_trainer(tmp_path, **plan)
    resumed.train_stages(["srm", "kd"], resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    assert [e["step"] for e in resumed.state.log_history if "loss" in e][:3] == [1, 2, 3]  # from checkpoint-2


def test_a_checkpoint_folder_written_again_is_incomplete_until_its_last_file(tmp_path, monkeypatch):
    make_trainer(tmp_path, method="kd", save_strategy="steps", save_steps=2).train()  # complete checkpoint-2, -4
    rerun = make_trainer(tmp_path, method="kd", save_strategy="steps", save_steps=2)  # the same output_dir

    def killed(output_dir):
        raise KeyboardInterrupt(f"killed while writing {output_dir}")

    monkeypatch.setattr(rerun, "_save_optimizer_and_scheduler", killed)  # after the student, before the rest
    with pytest.raises(KeyboardInterrupt):
        rerun.train()
    with pytest.raises(ValueError, match="checkpoint-2 is not a complete checkpoint"):  # half the rerun's, half not
        make_trainer(tmp_path, method="kd").train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_fp16_on_the_cpu_and_hyperparameter_search_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16=True on the CPU.*bf16=True"):
        make_config(tmp_path, fp16=True)
    with pytest.raises(NotImplementedError, match="one DistillationTrainer per trial"):
        make_trainer(tmp_path, method="kd").hyperparameter_search()


def test_log_level_reaches_the_libraries_own_messages_and_the_root_loggers_handlers(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # a handler on the root logger, as logging.basicConfig(level=INFO) adds
    make_trainer(tmp_path / "a", log_level="info", srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=1).train()
    assert any(r.name.startswith("srm_hf") and "Stage plan of method 'srm'" in r.message for r in caplog.records)
    caplog.clear()
    make_trainer(tmp_path / "b", log_level="warning", srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=1).train()
    assert not any("Stage plan" in r.message for r in caplog.records)
    caplog.clear()
    make_trainer(tmp_path / "c", srm_dictionary_max_steps=1, srm_max_steps=1, max_steps=1).train()  # "passive"
    assert any("Stage plan" in r.message for r in caplog.records)  # the logging configuration's level decides


def test_a_scheduler_asked_for_before_train_is_refused_with_the_way_to_get_one(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(RuntimeError, match="schedule follows the stage plan, which train\\(\\) builds.*inside train"):
        trainer.create_optimizer_and_scheduler(num_training_steps=12)
    assert trainer.optimizer is not None  # the optimizer alone is fine before training
    trainer.train()  # and the run is unharmed


def test_a_final_stage_stopped_early_is_listed_with_the_steps_it_ran(tmp_path):
    """Early stopping ends the KD stage (steps 9-12) at step 10: the card lists it, as the stage the student took."""
    class StopAt10(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop |= state.global_step == 10

    trainer = make_trainer(tmp_path, callbacks=[StopAt10()])
    trainer.train()
    assert trainer.stages_trained == {"dictionary": 4, "srm": 4, "kd": 2}
    assert "kd (2 steps)" in trainer.create_model_card()


def test_a_model_api_asked_of_the_wrapper_names_where_the_student_is(tmp_path):
    trainer = make_trainer(tmp_path, method="kd")
    with pytest.raises(AttributeError, match="'save_pretrained'.*trainer.distill_model.student.*save_model"):
        trainer.model.save_pretrained(str(tmp_path / "student"))
    assert not hasattr(trainer.model, "device") and trainer.model.student is trainer.distill_model.student
    with pytest.raises(AttributeError, match="no_such_thing"):
        trainer.model.no_such_thing


def test_checkpoints_whose_markers_record_no_time_are_resumed_by_step(tmp_path):
    """Markers written before they recorded a time (or any copied folder's): the highest step is the newest."""
    from srm_hf.checkpoint import COMPLETE_NAME
    from srm_hf.resume import resolve_resume

    for step in (12, 6):  # written in this order: file times would say checkpoint-6 is newer
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / COMPLETE_NAME).write_text(f'{{"global_step": {step}, "model_only": false}}')
    assert resolve_resume(str(tmp_path), True) == str(tmp_path / "checkpoint-12")


@pytest.mark.parametrize("options, match", [
    (dict(lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=1),
     "lr_scheduler_type='reduce_lr_on_plateau' cannot be restarted per stage"),
    (dict(lr_scheduler_type="warmup_stable_decay"),
     "lr_scheduler_type='warmup_stable_decay' with lr_scheduler_kwargs=\\{\\} cannot build its schedule.*"
     "num_decay_steps.*lr_scheduler_kwargs"),
])
def test_a_schedule_that_cannot_follow_the_stages_is_refused_with_the_config(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **options)
    make_config(tmp_path, lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"num_decay_steps": 2})


def test_batch_eval_metrics_needs_a_compute_metrics_that_takes_compute_result(tmp_path):
    """batch_eval_metrics calls compute_metrics per batch with compute_result: refused before the earlier stages
    train when it cannot take it; srm_hf's own gives the accuracy of the whole set, as without the option."""
    with pytest.raises(ValueError, match="batch_eval_metrics=True.*compute_result.*make_compute_metrics"):
        DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), train_dataset=PatternDataset(8),
                            args=make_config(tmp_path, batch_eval_metrics=True), compute_metrics=lambda p: {})
    results = []
    for batched in (False, True):
        trainer = make_trainer(tmp_path / str(batched), method="kd", max_steps=1, batch_eval_metrics=batched,
                               per_device_eval_batch_size=3)  # 16 images: the last batch is smaller
        trainer.compute_metrics = make_compute_metrics()
        results.append(trainer.evaluate()["eval_accuracy"])
    assert results[0] == results[1]
