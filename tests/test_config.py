import pytest
import torch
from conftest import make_config

from srm_hf import DistillationConfig

from srm_hf.methods import METHODS


def stage_names(cfg):
    return [s.name for s in METHODS[cfg.method].from_config(cfg).stages()]


def test_defaults_follow_the_paper(tmp_path):
    cfg = make_config(tmp_path)
    assert (cfg.srm_mode, cfg.srm_codeword_multiplier, cfg.srm_sparsity_multiplier, cfg.srm_targets) == (
        "paper", 2.0, 0.02, "both")
    assert cfg.srm_pixel_ce_on_sigmoid and cfg.srm_pixel_weight == 1.0 and cfg.srm_image_weight == 1.0
    assert stage_names(cfg) == ["dictionary", "srm", "kd"]
    assert cfg.ddp_find_unused_parameters is True
    assert stage_names(make_config(tmp_path, srm_mode="joint")) == ["dictionary", "joint"]
    assert stage_names(make_config(tmp_path, method="fitnet")) == ["hint", "kd"]
    assert stage_names(make_config(tmp_path, method="alone")) == ["ce"]
    assert stage_names(make_config(tmp_path, method="dkd")) == ["dkd"]
    assert stage_names(make_config(tmp_path, method="reviewkd")) == ["reviewkd"]


@pytest.mark.parametrize("method, field, value", [("kd", "dkd_beta", 2.0), ("kd", "srm_mode", "joint"),
                                                  ("dkd", "kd_alpha", 0.9), ("srm", "fitnet_epochs", 3.0),
                                                  ("alone", "kd_temperature", 2.0), ("fitnet", "reviewkd_weight", 1.0)])
def test_a_field_of_another_method_is_refused(tmp_path, method, field, value):
    with pytest.raises(ValueError, match=f"{field}=.*the method is {method!r}.*Remove {field}"):
        make_config(tmp_path, method=method, **{field: value})


def test_methods_ending_with_kd_accept_its_fields(tmp_path):
    for method in ("srm", "fitnet", "at"):
        assert make_config(tmp_path, method=method, kd_alpha=0.9).kd_alpha == 0.9


def test_layer_pairs_parse(tmp_path):
    cfg = make_config(tmp_path, layer_pairs=["layer2:resnet.encoder.stages.1", "global_pool:classifier.0"])
    assert cfg.explicit_pairs == [("layer2", "resnet.encoder.stages.1"), ("global_pool", "classifier.0")]
    assert make_config(tmp_path).explicit_pairs is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("srm_mode", "fitnet", "srm_mode='fitnet'"),
        ("method", "crd", "method='crd'"),
        ("at_beta", -1.0, "at_beta"),
        ("srm_targets", "pixels", "srm_targets"),
        ("srm_codeword_multiplier", 0.0, "srm_codeword_multiplier"),
        ("srm_weight", float("nan"), "finite"),
        ("dkd_temperature", 0.0, "dkd_temperature"),
        ("dkd_warmup_ratio", 1.5, "dkd_warmup_ratio"),
        ("srm_sparsity_multiplier", 1.5, "srm_sparsity_multiplier"),
        ("kd_alpha", 1.2, "kd_alpha"),
        ("kd_temperature", 0.0, "kd_temperature"),
        ("kd_temperature", 1e5, r"kd_temperature=100000.0 must be in \(0, 1000\]"),
        ("srm_weight", -1.0, "srm_weight"),
        ("layer_pairs", ["layer2"], "teacher.module:student.module"),
        ("layer_pairs", ["a:b:c"], "one colon"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **{field: value})


def test_stage_without_length(tmp_path):
    with pytest.raises(ValueError, match="srm_epochs"):
        make_config(tmp_path, srm_epochs=0, srm_max_steps=-1)
    with pytest.raises(ValueError, match="fitnet_epochs"):
        make_config(tmp_path, method="fitnet", fitnet_epochs=0)
    assert make_config(tmp_path, srm_mode="joint", srm_epochs=0).srm_epochs == 0  # joint mode has no such stage


def test_parses_from_the_command_line():
    from transformers import HfArgumentParser

    from srm_hf import DistillationConfig

    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--srm_mode", "joint", "--layer_pairs", "a:b", "c:d", "--srm_pixel_ce_on_sigmoid", "false",
         "--use_cpu", "true"]
    )
    assert cfg.srm_mode == "joint" and cfg.explicit_pairs == [("a", "b"), ("c", "d")] and not cfg.srm_pixel_ce_on_sigmoid


@pytest.mark.parametrize("launched, bf16, fp16", [("bf16", True, False), ("fp16", False, True), ("no", False, False)])
def test_the_launch_configs_mixed_precision_fills_unset_flags(tmp_path, monkeypatch, launched, bf16, fp16):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    if fp16:  # fp16 on the CPU is refused: this test stands on a GPU machine
        monkeypatch.setattr(DistillationConfig, "device", property(lambda self: torch.device("cuda")))
    config = make_config(tmp_path, use_cpu=False) if fp16 else make_config(tmp_path)
    assert (config.bf16, config.fp16) == (bf16, fp16)


def test_explicit_settings_win_over_the_launch_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert (make_config(tmp_path, bf16=True).fp16, make_config(tmp_path, use_cpu=False, fp16=False).fp16) == (False,
                                                                                                            False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_config(tmp_path, bf16=False).bf16 is False
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert make_config(tmp_path, use_cpu=None).use_cpu is True  # unset: the launch config decides
    assert make_config(tmp_path, use_cpu=False).use_cpu is False  # set: kept
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert make_config(tmp_path, use_cpu=None).use_cpu is False


def test_a_launch_config_that_compiles_the_whole_module_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # `accelerate launch --dynamo_backend inductor`
    with pytest.raises(ValueError, match="dynamo_backend=INDUCTOR.*--compile_student / --compile_teacher"):
        make_config(tmp_path, compile_student=True)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert make_config(tmp_path).torch_compile is False


def test_the_same_run_for_another_method(tmp_path):
    srm = make_config(tmp_path, srm_codeword_multiplier=3.0, kd_alpha=0.9, learning_rate=0.05)
    kd = srm.for_method("kd", max_steps=7)
    assert (kd.method, kd.kd_alpha, kd.learning_rate, kd.max_steps) == ("kd", 0.9, 0.05, 7)
    assert kd.srm_codeword_multiplier == 2.0 and kd.srm_dictionary_max_steps == -1  # SRM's own fields reset
    alone = srm.for_method("alone")
    assert alone.kd_alpha == 0.5 and alone.learning_rate == 0.05


def test_one_compile_switch(tmp_path):
    config = make_config(tmp_path, compile_student=True, torch_compile_backend="aot_eager")
    assert config.compile_student and not config.torch_compile  # the Trainer does not compile a second time
    for setting in ({"torch_compile": True}, {"torch_compile_backend": "inductor"}):
        with pytest.raises(ValueError, match="compile_student=True"):
            make_config(tmp_path, **setting)
    teacher_only = make_config(tmp_path, compile_teacher=True, torch_compile_mode="reduce-overhead")
    assert teacher_only.compile_teacher and not teacher_only.torch_compile and not teacher_only.compile_student
    with pytest.raises(ValueError, match="compile_teacher alone compiles the teacher: add compile_student=True"):
        make_config(tmp_path, compile_teacher=True, torch_compile=True)  # the student is not silently left out


def test_none_for_a_field_that_needs_a_value_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="srm_max_steps=None: srm_max_steps needs a value \\(its default is -1\\)"):
        make_config(tmp_path, srm_max_steps=None)
    for name, default in (("max_grad_norm", 1.0), ("warmup_steps", 0), ("seed", 42), ("weight_decay", 0.0)):
        with pytest.raises(ValueError, match=f"{name}=None: {name} needs a value \\(its default is {default}\\)"):
            make_config(tmp_path, **{name: None})  # TrainingArguments' fields too, before its own checks
    make_config(tmp_path, layer_pairs=None, teacher_model_name_or_path=None, eval_steps=None)  # these may be None
