"""Every `transformers.TrainingArguments` field, classified: it works with the stages (the test that shows it, or why
none is needed), or it is refused (the check, and options that trigger it). A field the installed transformers has
and the table does not classify fails the guard, so that a new release cannot add an option that is silently
ignored. Fields of other releases (the floor, 5.9, has `warmup_ratio` and `logging_dir`) may stay in the table."""

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import PatternDataset, hf_resnet, make_config, make_trainer, parallelism_config, timm_resnet
from transformers import TrainingArguments

from srm_hf import DistillationTrainer

HERE = Path(__file__).resolve().parent


def works(why: str) -> tuple:
    return ("works", why, None, None)


def refused(options: dict, check: str, at: str = "config") -> tuple:
    """Refused when `options` are set, by `check`, when the config is built (`at="config"`) or the trainer is."""
    return ("refused", check, options, at)


STAGES = {"stage_batch_sizes": {"dictionary": 16}}
OPTIONS = {
    "output_dir": works("every run writes there; test_an_output_dir_gone_unwritable_is_refused_by_the_trainer_..."),
    "per_device_train_batch_size": works("every stage's batch: test_accumulation_matches_the_larger_batch"),
    "num_train_epochs": works("sizes the final stage: test_epoch_evaluation_counts_the_final_stage_passes_..."),
    "max_steps": works("sizes the final stage: test_stage_steps"),
    "learning_rate": works("the student's groups, per stage: test_per_stage_learning_rates"),
    "lr_scheduler_type": refused({"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps",
                                  "eval_steps": 1}, "stages._stage_lambda: step-based ones restart per stage"),
    "lr_scheduler_kwargs": works("test_absolute_scheduler_kwargs_are_read_against_each_groups_learning_rate"),
    "warmup_steps": works("per stage: test_each_group_follows_its_stages_schedule, test_a_warmup_as_long_as_..."),
    "warmup_ratio": works("transformers 5.9: read through args.get_warmup_steps per stage, as warmup_steps"),
    "optim": refused({"optim": "galore_adamw"}, "check_trainer_options; group optimizers work (test_host_work)"),
    "optim_args": works("reaches the optimizer; resuming with others refused: test_resuming_with_another_..."),
    "weight_decay": works("DistillationModel.param_groups; test_resuming_with_another_learning_rate_or_..."),
    "adam_beta1": works("reaches the optimizer; recorded for resuming: test_resuming_with_another_learning_rate_..."),
    "adam_beta2": works("reaches the optimizer; recorded for resuming: test_resuming_with_another_learning_rate_..."),
    "adam_epsilon": works("reaches the optimizer; recorded for resuming: test_resuming_with_another_learning_rate_..."),
    "optim_target_modules": refused({"optim_target_modules": "all-linear"}, "check_trainer_options"),
    "gradient_accumulation_steps": works("test_accumulation_matches_the_larger_batch"),
    "average_tokens_across_devices": works("no token counts: losses are batch means (accepts_loss_kwargs=False)"),
    "max_grad_norm": works("clips every stage; test_reference_preset (refused with preset='reference')"),
    "label_smoothing_factor": works("test_label_smoothing_reaches_every_cross_entropy_with_labels"),
    "bf16": works("test_bf16_autocast_with_float32_targets_and_losses"),
    "fp16": refused({"fp16": True}, "check_trainer_options, on the CPU; on CUDA: test_mixed_precision_on_cuda"),
    "bf16_full_eval": refused({"bf16_full_eval": True}, "check_trainer_options"),
    "fp16_full_eval": refused({"fp16_full_eval": True}, "check_trainer_options"),
    "tf32": works("torch's global TF32 flags, which the kernels follow (test_fused, test_gpu)"),
    "activation_checkpointing": works("delegated to the student: test_gradient_checkpointing_gives_the_same_losses"),
    "activation_checkpointing_kwargs": works("test_options_for_timms_checkpointing_which_takes_none_are_refused"),
    "gradient_checkpointing": works("alias: test_gradient_checkpointing_gives_the_same_losses"),
    "gradient_checkpointing_kwargs": works("alias: test_options_for_timms_checkpointing_which_takes_none_are_..."),
    "torch_compile": refused({"torch_compile": True}, "DistillationConfig: compile_student / compile_teacher"),
    "torch_compile_backend": refused({"torch_compile_backend": "inductor"}, "DistillationConfig, without compile_*"),
    "torch_compile_mode": refused({"torch_compile_mode": "default"}, "DistillationConfig, without compile_*"),
    "use_liger_kernel": refused({"use_liger_kernel": True}, "check_trainer_options"),
    "liger_kernel_config": refused({"liger_kernel_config": {"rope": False}}, "check_trainer_options"),
    "use_cache": works("set on the student's config: test_trainer_options_that_act_in_the_trainer_loop"),
    "neftune_noise_alpha": refused({"neftune_noise_alpha": 5.0}, "check_trainer_options"),
    "torch_empty_cache_steps": works("in Trainer.training_step: test_trainer_options_that_act_in_the_trainer_loop"),
    "auto_find_batch_size": refused({"auto_find_batch_size": True}, "check_trainer_options"),
    "logging_strategy": refused({**STAGES, "logging_strategy": "epoch"}, "check_stage_batch_options; else callbacks"),
    "logging_steps": works("test_a_skipped_steps_loss_and_terms_drop_out_of_its_log_windows_means"),
    "logging_first_step": works("test_trainer_options_that_act_in_the_trainer_loop"),
    "log_on_each_node": works("which processes log: logging only"),
    "logging_nan_inf_filter": works("test_without_the_nan_loss_filter_every_steps_loss_and_terms_count"),
    "include_num_input_tokens_seen": works("counts pixel values: test_trainer_options_that_act_in_the_trainer_loop"),
    "log_level": works("test_log_level_reaches_the_libraries_own_messages_and_the_root_loggers_handlers"),
    "log_level_replica": works("callbacks.follow_log_level, on the other processes"),
    "disable_tqdm": works("test_stage_names_shown_in_the_progress_bar"),
    "report_to": works("logging integrations: they receive the logs, stage and terms included"),
    "run_name": works("logging metadata"),
    "project": works("logging metadata"),
    "trackio_space_id": works("logging metadata"),
    "trackio_bucket_id": works("logging metadata"),
    "trackio_static_space_id": works("logging metadata"),
    "logging_dir": works("transformers 5.9: TensorBoard's folder, logging metadata"),
    "eval_strategy": works("final stage only: test_epoch_evaluation_waits_for_the_final_stage"),
    "eval_steps": works("test_early_stopping_and_best_model_act_in_the_final_stage_only"),
    "eval_delay": refused({**STAGES, "eval_delay": 2}, "check_stage_batch_options; else test_epoch_evaluation_..."),
    "per_device_eval_batch_size": works("the Trainer's evaluation loader: test_batch_eval_metrics_needs_a_..."),
    "prediction_loss_only": refused({"prediction_loss_only": True, "metric_for_best_model": "accuracy"},
                                    "check_trainer_arguments", at="trainer"),
    "eval_on_start": works("test_trainer_options_that_act_in_the_trainer_loop, test_reference_preset"),
    "eval_do_concat_batches": works("the Trainer's loop: test_trainer_options_that_act_in_the_trainer_loop"),
    "eval_use_gather_object": works("the Trainer's evaluation loop, which compute_loss feeds the student's outputs"),
    "eval_accumulation_steps": works("the Trainer's loop: test_trainer_options_that_act_in_the_trainer_loop"),
    "include_for_metrics": works("the Trainer's loop: test_trainer_options_that_act_in_the_trainer_loop"),
    "batch_eval_metrics": refused({"batch_eval_metrics": True}, "check_trainer_arguments, when compute_metrics "
                                  "takes no compute_result", at="trainer"),
    "save_only_model": works("saves; refused for resuming: test_a_model_only_checkpoint_is_refused_for_resuming"),
    "save_strategy": works("test_resume_in_the_middle_of_stage2_matches_an_uninterrupted_run; 'best': test_recipes"),
    "save_steps": works("test_resume_in_the_middle_of_stage2_matches_an_uninterrupted_run"),
    "save_on_each_node": works("args.should_save gates the student, the completion marker and the rotation"),
    "save_total_limit": works("test_save_total_limit_keeps_the_newest_complete_checkpoints_and_each_records_..."),
    "enable_jit_checkpoint": refused({"enable_jit_checkpoint": True}, "check_trainer_options"),
    "push_to_hub": works("test_hub_strategy_every_save_pushes_each_checkpoint_student_in_the_background"),
    "hub_token": works("test_push_to_hub_takes_the_trainer_card_arguments_and_writes_hub_metadata"),
    "hub_private_repo": works("test_push_to_hub_takes_the_trainer_card_arguments_and_writes_hub_metadata"),
    "hub_model_id": works("test_push_transformers_student_round_trip"),
    "hub_strategy": refused({"push_to_hub": True, "hub_model_id": "user/student", "hub_strategy": "checkpoint"},
                            "check_trainer_options; every_save: test_hub_strategy_every_save_pushes_..."),
    "hub_always_push": works("HubMixin: a save pushes though the previous push still runs"),
    "hub_revision": works("test_push_to_hub_takes_the_trainer_card_arguments_and_writes_hub_metadata"),
    "load_best_model_at_end": works("test_early_stopping_and_best_model_act_in_the_final_stage_only"),
    "metric_for_best_model": works("test_selecting_on_a_metric_nothing_computes_is_refused_before_training"),
    "greater_is_better": works("test_early_stopping_and_best_model_act_in_the_final_stage_only"),
    "ignore_data_skip": refused({**STAGES, "ignore_data_skip": True}, "check_stage_batch_options; else the Trainer's"),
    "restore_callback_states_from_checkpoint": works("the Trainer's stateful callbacks; srm_hf's read the marker"),
    "full_determinism": works("test_trainer_options_that_act_in_the_trainer_loop; DistillationModel.from_models"),
    "seed": works("test_the_seed_draws_the_modules_the_method_builds"),
    "data_seed": works("test_data_seed_and_sequential_sampling_reach_the_stage_sampler"),
    "use_cpu": works("every CPU test; test_the_launch_configs_mixed_precision_fills_unset_flags"),
    "accelerator_config": refused({**STAGES, "accelerator_config": {"split_batches": True}},
                                  "check_stage_batch_options; else Accelerate's"),
    "parallelism_config": refused({"parallelism_config": parallelism_config()},
                                  "check_trainer_options"),
    "dataloader_drop_last": works("test_a_last_batch_of_one_is_refused_where_batchnorm_would_train_on_it"),
    "dataloader_num_workers": works("test_the_stage_loader_takes_the_trainers_loader_options"),
    "dataloader_pin_memory": works("test_the_stage_loader_takes_the_trainers_loader_options"),
    "dataloader_persistent_workers": works("test_the_stage_loader_takes_the_trainers_loader_options"),
    "dataloader_prefetch_factor": works("test_the_stage_loader_takes_the_trainers_loader_options"),
    "dataloader_multiprocessing_context": works("stage_batches.stage_batch_loader passes it on, as the Trainer"),
    "dataloader_in_order": works("stage_batches.stage_batch_loader passes it on, as the Trainer"),
    "remove_unused_columns": works("test_remove_unused_columns_is_refused_only_where_it_drops_what_a_transform_..."),
    "label_names": refused({"label_names": ["target"]}, "check_trainer_options"),
    "train_sampling_strategy": refused({"train_sampling_strategy": "group_by_length"}, "check_trainer_options"),
    "length_column_name": refused({"length_column_name": "n_pixels"}, "check_trainer_options"),
    "ddp_find_unused_parameters": refused({"ddp_find_unused_parameters": False}, "check_trainer_arguments",
                                          at="trainer"),
    "ddp_static_graph": refused({"ddp_static_graph": True}, "check_trainer_arguments", at="trainer"),
    "ddp_bucket_cap_mb": works("DDP's wrapper of the student and the method's modules: test_two_processes_match_one"),
    "ddp_broadcast_buffers": works("DDP's wrapper of the student and the method's modules"),
    "ddp_backend": works("the process group: test_two_processes_match_one"),
    "ddp_timeout": works("the process group: test_two_processes_match_one"),
    "fsdp": works("test_recipe_runs_under_engine (GPU); the teacher is never wrapped"),
    "fsdp_config": works("test_recipe_runs_under_engine (GPU)"),
    "deepspeed": works("ZeRO-2: test_under_deepspeed_the_teacher_takes_the_engines_precision_frozen; ZeRO-3 refused"),
    "debug": works("underflow_overflow hooks the trained module: test_trainer_options_that_act_in_the_trainer_loop"),
    "skip_memory_metrics": works("test_trainer_options_that_act_in_the_trainer_loop"),
    "do_train": works("not read by the Trainer (scripts' switches); recipes/distill.py refuses it"),
    "do_eval": works("not read by the Trainer (scripts' switches); recipes/distill.py refuses it"),
    "do_predict": works("not read by the Trainer (scripts' switches); recipes/distill.py refuses it"),
    "resume_from_checkpoint": works("read by recipes/distill.py; train(resume_from_checkpoint=): test_checkpoint"),
    "local_rank": works("set by the launcher: test_two_processes_match_one"),
}


def test_every_training_argument_is_classified():
    unclassified = [f.name for f in dataclasses.fields(TrainingArguments) if f.name not in OPTIONS]
    assert not unclassified, (f"TrainingArguments fields {unclassified} are not classified: decide whether each "
                              "works with the stages or is refused (srm_hf/trainer_options.py), and add it to OPTIONS "
                              "in tests/test_option_coverage.py.")
    assert all(entry[0] in ("works", "refused") and entry[1] for entry in OPTIONS.values())


def test_the_tests_the_table_cites_exist():
    files = list(HERE.glob("test_*.py"))  # a test's name, or a test file's
    defined = {p.stem for p in files} | set(re.findall(r"^def (test_\w+)", "".join(p.read_text() for p in files), re.M))
    cited = {name.rstrip("_") for entry in OPTIONS.values() for name in re.findall(r"test_\w+", entry[1])}
    missing = [name for name in sorted(cited) if not any(d.startswith(name) for d in defined)]  # '_...': a prefix
    assert not missing, f"OPTIONS cites tests that do not exist: {missing}"


REFUSED = {name: entry for name, entry in OPTIONS.items() if entry[0] == "refused" and all(  # this release's
    option in TrainingArguments.__dataclass_fields__ and value is not None  # options (an import may have failed)
    for option, value in entry[2].items() if option != "stage_batch_sizes")}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_refused_option_is_refused_naming_it(tmp_path, name):
    _, check, options, at = REFUSED[name]
    with pytest.raises(ValueError, match=name) as refusal:
        if at == "config":
            make_config(tmp_path, **options)
        else:
            DistillationTrainer(model=hf_resnet(), teacher_model=timm_resnet(), args=make_config(tmp_path, **options),
                                train_dataset=PatternDataset(8), compute_metrics=lambda p: {"accuracy": 0.0})
    raised_in = Path(str(refusal.traceback[-1].path))
    assert "srm_hf" in raised_in.parts, f"{name} was refused by {raised_in}, not by srm_hf's own check ({check})"


SEEN = []  # what compute_metrics was given


def see(eval_pred):
    SEEN.append(eval_pred)
    return {}


@pytest.mark.parametrize("options, holds", [
    (dict(eval_on_start=True, eval_strategy="steps", eval_steps=1),
     lambda t: [e["step"] for e in t.state.log_history if "eval_loss" in e] == [0, 1, 2]),
    (dict(include_num_input_tokens_seen="all"), lambda t: t.state.num_input_tokens_seen == 2 * 8 * 3 * 32 * 32),
    (dict(logging_first_step=True, logging_steps=10, max_steps=3),
     lambda t: [e["step"] for e in t.state.log_history if "loss" in e] == [1, 3]),
    (dict(skip_memory_metrics=False), lambda t: "train_mem_cpu_alloc_delta" in t.state.log_history[-1]),
    (dict(use_cache=True), lambda t: t.distill_model.student.config.use_cache is True),
    (dict(torch_empty_cache_steps=1, debug="underflow_overflow"), lambda t: t.state.global_step == 2),
    (dict(include_for_metrics=["inputs", "loss"], eval_strategy="steps", eval_steps=2),
     lambda t: SEEN[-1].inputs is not None and SEEN[-1].losses is not None),
    (dict(eval_do_concat_batches=False, eval_accumulation_steps=1, eval_strategy="steps", eval_steps=2,
          per_device_eval_batch_size=4), lambda t: len(SEEN[-1].predictions) == 4),
    (dict(full_determinism=True), lambda t: torch.are_deterministic_algorithms_enabled()),
])
def test_trainer_options_that_act_in_the_trainer_loop(tmp_path, monkeypatch, options, holds):
    """Options the Trainer applies in its own loop, which DistillationTrainer runs: a short KD run with each."""
    for variable in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG"):  # what full_determinism sets, put back
        monkeypatch.setenv(variable, os.environ.get(variable, ""))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    SEEN.clear()
    trainer = make_trainer(tmp_path, method="kd", **{"max_steps": 2, **options})
    trainer.compute_metrics = see
    try:
        trainer.train()
        assert holds(trainer), options
    finally:
        torch.use_deterministic_algorithms(False)
