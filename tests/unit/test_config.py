"""Config: every bad value gives its own one-line ConfigError naming the field and the value; YAML
loading; precedence defaults < YAML < Megatron-style flags < ``--set``."""

from __future__ import annotations

import copy

import pytest

from megatron_vlm import config as C
from megatron_vlm.archs import ArchSpec, get_arch, register_arch
from megatron_vlm.config import Config, ConfigError, validate

# an arch with experts, registered from this file (the registry's extension point)
register_arch(ArchSpec(name="toy_experts", summary="joint decoder that declares experts", experts=True,
                       model_class=get_arch("joint_decoder").model_class,
                       block_spec=get_arch("joint_decoder").block_spec,
                       token_layout=get_arch("joint_decoder").token_layout))


def base() -> Config:
    """A valid config for world sizes 1, 2 and 4 (checked below)."""
    cfg = Config()
    cfg.model.language.num_layers = 4
    return cfg


def _set(**changes):
    """Returns a mutation that sets dotted paths, e.g. _set(**{"parallel.sequence_parallel": True})."""
    def mutate(cfg):
        for path, value in changes.items():
            C.set_key(cfg, path, value)
        return cfg
    return mutate


# id: (mutation, world size, the exact start of the one-line message: field=value)
BAD = {
    "unknown_arch": (_set(**{"model.arch": "llava2"}), None, "model.arch='llava2': allowed ["),
    "unknown_backend": (_set(**{"model.backend": "cuda"}), None, "model.backend='cuda': allowed ['auto', 'local', 'te']"),
    "unknown_projector": (_set(**{"model.projector": "conv"}), None, "model.projector='conv': allowed"),
    "zero_layers": (_set(**{"model.language.num_layers": 0}), None, "model.language.num_layers=0: must be a positive integer"),
    "bool_is_not_int": (_set(**{"parallel.tensor_model_parallel_size": True}), None,
                        "parallel.tensor_model_parallel_size=True: must be a positive integer"),
    "string_layers": (_set(**{"model.vision.num_layers": "2"}), None, "model.vision.num_layers='2': must be a positive integer"),
    "zero_micro_batch": (_set(**{"training.micro_batch_size": 0}), None, "training.micro_batch_size=0: must be a positive integer"),
    "image_size_vs_patch": (_set(**{"model.vision.image_size": 6}), None,
                            "model.vision.image_size=6: must be at least model.vision.patch_size=8"),
    "vision_hidden_vs_heads": (_set(**{"model.vision.hidden_size": 66}), None,
                               "model.vision.hidden_size=66: must be divisible by model.vision.num_attention_heads=4"),
    "language_hidden_vs_heads": (_set(**{"model.language.num_attention_heads": 6}), None,
                                 "model.language.hidden_size=64: must be divisible by model.language.num_attention_heads=6"),
    "groups_divide_heads": (_set(**{"model.language.num_query_groups": 3}), None,
                            "model.language.num_query_groups=3: must divide model.language.num_attention_heads=4"),
    "negative_rope_scaling": (_set(**{"model.language.rope_scaling_factor": -1.0}), None,
                              "model.language.rope_scaling_factor=-1.0: must be a number > 0 (or null)"),
    "ca_text_row_mode": (_set(**{"model.arch": "cross_attention", "model.cross_attention.text_rows_without_image": "skip"}),
                         None, "model.cross_attention.text_rows_without_image='skip': allowed ['zero', 'hf']"),
    "zero_query_groups": (_set(**{"model.language.num_query_groups": 0}), None,
                          "model.language.num_query_groups=0: must be a positive integer"),
    "vision_heads_vs_tp": (_set(**{"parallel.tensor_model_parallel_size": 8}), None,
                           "model.vision.num_attention_heads=4: must be divisible by parallel.tensor_model_parallel_size=8"),
    "language_heads_vs_tp": (_set(**{"model.vision.num_attention_heads": 8, "model.language.num_attention_heads": 2,
                                     "parallel.tensor_model_parallel_size": 4}), None,
                             "model.language.num_attention_heads=2: must be divisible by parallel.tensor_model_parallel_size=4"),
    "query_groups_vs_tp": (_set(**{"model.language.num_query_groups": 2, "parallel.tensor_model_parallel_size": 4}), None,
                           "model.language.num_query_groups=2: must be divisible by parallel.tensor_model_parallel_size=4"),
    "vocab_vs_tp": (_set(**{"model.language.vocab_size": 511, "parallel.tensor_model_parallel_size": 2}), None,
                    "model.language.vocab_size=511: must be divisible by parallel.tensor_model_parallel_size=2"),
    "layers_vs_pp": (_set(**{"model.language.num_layers": 3, "parallel.pipeline_model_parallel_size": 2}), None,
                     "model.language.num_layers=3: must be divisible by parallel.pipeline_model_parallel_size=2"),
    "vpp_without_pp": (_set(**{"parallel.virtual_pipeline_model_parallel_size": 2}), None,
                       "parallel.virtual_pipeline_model_parallel_size=2: needs pipeline_model_parallel_size > 1"),
    "vpp_zero": (_set(**{"parallel.virtual_pipeline_model_parallel_size": 0,
                         "parallel.pipeline_model_parallel_size": 2}), None,
                 "parallel.virtual_pipeline_model_parallel_size=0: must be a positive integer"),
    "layers_vs_pp_x_vpp": (_set(**{"parallel.virtual_pipeline_model_parallel_size": 4,
                                   "parallel.pipeline_model_parallel_size": 2}), None,
                           "model.language.num_layers=4: must be divisible by pipeline x virtual stages = 8"),
    "sequence_parallel_without_tp": (_set(**{"parallel.sequence_parallel": True}), None,
                                     "parallel.sequence_parallel=True: needs tensor_model_parallel_size > 1"),
    "ep_without_experts": (_set(**{"parallel.expert_model_parallel_size": 2}), None,
                           "parallel.expert_model_parallel_size=2: only archs with experts take it (arch='joint_decoder' has none)"),
    "ep_vs_world": (_set(**{"model.arch": "toy_experts", "parallel.expert_model_parallel_size": 4}), 2,
                    "parallel.expert_model_parallel_size=4: must divide world size / pipeline size = 2"),
    "image_token_id_range": (_set(**{"model.image_token_id": 512}), None,
                             "model.image_token_id=512: must be in [0, vocab_size=512)"),
    "seq_length_vs_image_tokens": (_set(**{"model.language.seq_length": 16}), None,
                                   "model.language.seq_length=16: must exceed the 16 image tokens x 1 images per sample"),
    "cross_attention_every": (_set(**{"model.arch": "cross_attention", "model.cross_attention.every": 0}), None,
                              "model.cross_attention.every=0: must be a positive integer"),
    "lr_decay_style": (_set(**{"training.lr_decay_style": "step"}), None, "training.lr_decay_style='step': allowed"),
    "fp8_format": (_set(**{"training.fp8_format": "e5m2"}), None, "training.fp8_format='e5m2': allowed ['e4m3', 'hybrid']"),
    "fp8_with_local_backend": (_set(**{"training.fp8_format": "hybrid", "model.backend": "local"}), None,
                               "training.fp8_format='hybrid': needs model.backend 'te' or 'auto'"),
    "fp8_recipe": (_set(**{"training.fp8_format": "e4m3", "training.fp8_recipe": "fast"}), None,
                   "training.fp8_recipe='fast': allowed"),
    "lr_not_positive": (_set(**{"training.lr": 0.0}), None, "training.lr=0.0: must be a number > 0"),
    "lr_not_a_number": (_set(**{"training.lr": [1]}), None, "training.lr=[1]: must be a number > 0"),
    "world_vs_model_parallel": (_set(**{"parallel.tensor_model_parallel_size": 2}), 3,
                                "world size 3: must be divisible by tensor x pipeline x context parallel = 2"),
    "global_batch_vs_micro_x_dp": (_set(**{"training.global_batch_size": 6}), 2,
                                   "training.global_batch_size=6: must be divisible by micro_batch_size x "
                                   "data-parallel size = 2 x 2"),
    "global_batch_vs_micro": (_set(**{"training.micro_batch_size": 3}), 1,
                              "training.global_batch_size=8: must be divisible by micro_batch_size x "
                              "data-parallel size = 3 x 1"),
}


@pytest.mark.parametrize("world", [None, 1, 2, 4])
def test_base_config_is_valid(world):
    assert validate(base(), world_size=world).model.language.num_layers == 4


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_one_line_error(case):
    mutate, world, expected = BAD[case]
    cfg = mutate(base())
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_validate_does_not_modify_the_config():
    cfg = base()
    before = copy.deepcopy(cfg.to_dict())
    validate(cfg, world_size=2)
    assert cfg.to_dict() == before


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---- YAML, flags, --set -----------------------------------------------------------------------

YAML = """
model:
  language:
    num_layers: 6
    hidden_size: 128
    num_query_groups: 2
  vision:
    image_size: 48
    image_mean: [0.5, 0.5, 0.5]
  freeze_vision: true
parallel:
  tensor_model_parallel_size: 2
training:
  lr: 1e-4            # YAML 1.1 reads this as the string '1e-4'
  min_lr: 0
  micro_batch_size: 4
"""


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(YAML)
    return str(path)


def test_yaml_load(yaml_file):
    cfg = C.load_yaml(yaml_file)
    lang = cfg.model.language
    assert (lang.num_layers, lang.hidden_size, lang.num_query_groups) == (6, 128, 2)
    assert lang.num_attention_heads == C.LanguageConfig().num_attention_heads  # default kept
    assert cfg.model.vision_encoder.image_size == 48 and cfg.model.vision_encoder.image_mean == (0.5, 0.5, 0.5)
    assert cfg.model.freeze_vision is True and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.training.lr == 1e-4 and isinstance(cfg.training.lr, float)
    assert cfg.training.min_lr == 0.0 and isinstance(cfg.training.min_lr, float)
    validate(cfg, world_size=2)


def test_flags_override_yaml_and_set_overrides_both(yaml_file):
    yaml_only = C.parse(["--config", yaml_file])
    assert yaml_only.model.language.num_layers == 6 and yaml_only.training.micro_batch_size == 4

    flags = C.parse(["--config", yaml_file, "--num-layers", "8", "--lr", "0.5",
                     "--tensor-model-parallel-size", "1", "--micro-batch-size", "2"])
    assert flags.model.language.num_layers == 8 and flags.training.lr == 0.5
    assert flags.parallel.tensor_model_parallel_size == 1 and flags.training.micro_batch_size == 2
    assert flags.model.language.hidden_size == 128  # YAML value without a flag survives

    both = C.parse(["--config", yaml_file, "--num-layers", "8", "--lr", "0.5",
                    "--set", "model.language.num_layers=10", "--set", "training.lr=0.25",
                    "--set", "parallel.tensor_model_parallel_size=4"])
    assert both.model.language.num_layers == 10  # --set beats the flag and the YAML
    assert both.training.lr == 0.25
    assert both.parallel.tensor_model_parallel_size == 4  # --set beats the YAML
    # order on the command line does not matter: --set before the flag still wins
    swapped = C.parse(["--set", "model.language.num_layers=10", "--num-layers", "8"])
    assert swapped.model.language.num_layers == 10


def test_flag_types_and_mapping():
    cfg = C.parse(["--num-virtual-stages-per-pipeline-rank", "2", "--pipeline-model-parallel-size", "2",
                   "--num-layers", "4", "--transformer-impl", "local", "--sequence-parallel",
                   "--tensor-model-parallel-size", "2", "--no-use-distributed-optimizer", "--bf16",
                   "--num-query-groups", "2", "--seed", "7"])
    p = cfg.parallel
    assert p.virtual_pipeline_model_parallel_size == 2 and isinstance(p.virtual_pipeline_model_parallel_size, int)
    assert (p.pipeline_model_parallel_size, p.tensor_model_parallel_size, p.sequence_parallel) == (2, 2, True)
    assert cfg.model.backend == "local" and cfg.model.language.num_query_groups == 2
    assert cfg.training.use_distributed_optimizer is False and cfg.training.bf16 is True
    assert cfg.training.seed == 7 and cfg.model.vision_encoder.num_layers == C.VisionConfig().num_layers
    validate(cfg, world_size=4)
    defaults = C.parse([])
    assert defaults.to_dict() == Config().to_dict()


def test_set_parses_values_as_yaml():
    cfg = C.parse(["--set", "model.vision.patch_size=4", "--set", "parallel.sequence_parallel=true",
                   "--set", "model.language.num_query_groups=null", "--set", "training.lr=3e-4",
                   "--set", "model.cross_attention.layers=[1, 3]", "--set", "data.data_path=/x=y"])
    assert cfg.model.vision_encoder.patch_size == 4 and cfg.parallel.sequence_parallel is True
    assert cfg.model.language.num_query_groups is None and cfg.training.lr == 3e-4
    assert cfg.model.cross_attention.layers == [1, 3] and cfg.data.data_path == "/x=y"


BAD_LOAD = {  # id: (yaml text or None, argv, start of the one-line message)
    "unknown_top_key": ("modle: {}\n", [], "config: unknown key(s) ['modle']; allowed: ['data', 'model', 'parallel', 'training']"),
    "unknown_nested_key": ("model:\n  language:\n    num_layer: 2\n", [],
                           "config.model.language: unknown key(s) ['num_layer']; allowed: ["),
    "section_not_mapping": ("model:\n  vision: 3\n", [], "config.model.vision: expected a mapping, got int 3"),
    "yaml_lr_not_number": ("training:\n  lr: fast\n", [], "config.training.lr='fast': must be a number"),
    "missing_file": (None, ["--config", "/nonexistent/cfg.yaml"], "--config /nonexistent/cfg.yaml: no such file"),
    "set_without_equals": (None, ["--set", "model.language.num_layers"],
                           "--set 'model.language.num_layers': expected KEY=VALUE"),
    "set_unknown_key": (None, ["--set", "model.language.num_layer=2"],
                        "--set model.language.num_layer=2: unknown config key 'model.language.num_layer'"),
    "set_unknown_section": (None, ["--set", "modle.language.num_layers=2"],
                            "--set modle.language.num_layers=2: unknown config section 'modle'"),
    "set_through_a_value": (None, ["--set", "model.arch.x=2"], "--set model.arch.x=2: unknown config key 'model.arch.x'"),
    "set_whole_section": (None, ["--set", "model.vision=3"], "--set model.vision=3: 'model.vision' is a config section"),
    "set_lr_not_number": (None, ["--set", "training.lr=fast"], "--set training.lr=fast: training.lr='fast': must be a number"),
}


@pytest.mark.parametrize("case", list(BAD_LOAD))
def test_bad_yaml_or_set_one_line_error(case, tmp_path):
    text, argv, expected = BAD_LOAD[case]
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        argv = ["--config", str(path)] + argv
    with pytest.raises(ConfigError) as info:
        C.parse(argv)
    message = str(info.value)
    assert "\n" not in message and message.startswith(expected), message


def test_bad_flag_value_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        C.parse(["--num-layers", "four"])
    assert "--num-layers: invalid int value: 'four'" in capsys.readouterr().err


def test_real_example_config_validates():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "configs" / "llama3_8b_vitl_fp8.yaml"
    cfg = C.load_yaml(path)
    assert cfg.parallel.tensor_model_parallel_size == 4 and cfg.training.lr == 2.0e-5
    validate(cfg, world_size=64)
    with pytest.raises(ConfigError, match=r"^training.global_batch_size=256: must be divisible by "
                                          r"micro_batch_size x data-parallel size = 1 x 3$"):
        validate(cfg, world_size=24)
