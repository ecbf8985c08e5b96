"""model.mot: every bad value is one line naming the field, the value and what is allowed; the
from_dense map (warm start / upcycling) of a dense decoder's tensors."""

from __future__ import annotations

import pytest

from megatron_vlm import config as C
from megatron_vlm.archs import get_arch
from megatron_vlm.config import Config, ConfigError, validate


def mot(**changes) -> Config:
    cfg = Config()
    cfg.model.arch = "mot"
    for path, value in changes.items():
        C.set_key(cfg, path, value)
    return cfg


BAD = {  # id: (changes, world size, exact start of the message)
    "modalities_missing": ({"model.mot.modalities": ["text"]}, 1,
                           "model.mot.modalities=['text']: allowed ['image', 'text']"),
    "modalities_unknown": ({"model.mot.modalities": ["image", "audio"]}, 1,
                           "model.mot.modalities=['image', 'audio']: allowed ['image', 'text']"),
    "modalities_repeated": ({"model.mot.modalities": ["image", "text", "text"]}, 1,
                            "model.mot.modalities=['image', 'text', 'text']: allowed ['image', 'text']"),
    "modalities_not_a_list": ({"model.mot.modalities": "image"}, 1,
                              "model.mot.modalities='image': allowed ['image', 'text']"),
    "untie_norms": ({"model.mot.untie_norms": "yes"}, 1, "model.mot.untie_norms='yes': allowed true or false"),
    "qk_norm": ({"model.mot.qk_norm": 1}, 1, "model.mot.qk_norm=1: allowed true or false"),
    "context_parallel": ({"parallel.context_parallel_size": 2}, 2,
                         "parallel.context_parallel_size=2 with mot: allowed 1"),
    "expert_parallel": ({"parallel.expert_model_parallel_size": 2}, 2,
                        "parallel.expert_model_parallel_size=2: only archs with experts take it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mot_config_is_one_line(case):
    changes, world, expected = BAD[case]
    cfg = mot()
    for path, value in changes.items():  # bypass --set parsing: the raw value reaches validate
        section, _, name = path.rpartition(".")
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        setattr(obj, name, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world)
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_valid_mot_configs():
    validate(mot(), world_size=1)
    validate(mot(**{"model.mot.modalities": ["text", "image"], "model.mot.untie_norms": False,
                    "model.mot.qk_norm": True}), world_size=1)
    validate(mot(**{"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
                    "parallel.pipeline_model_parallel_size": 2}), world_size=4)


def test_yaml_section_round_trip():
    cfg = C.from_dict({"model": {"arch": "mot", "mot": {"untie_norms": False, "qk_norm": True}}})
    assert cfg.model.mot.untie_norms is False and cfg.model.mot.qk_norm is True
    assert cfg.model.mot.modalities == ["image", "text"]


def test_from_dense_copies_each_layer_tensor_into_every_modality():
    spec = get_arch("mot")
    untied, shared = mot().model, mot(**{"model.mot.untie_norms": False}).model
    L = "language_model.decoder.layers.3."
    assert spec.from_dense(untied, L + "mlp.linear_fc1.weight") == [L + "mlp.image.linear_fc1.weight",
                                                                    L + "mlp.text.linear_fc1.weight"]
    assert spec.from_dense(untied, L + "self_attention.linear_qkv.weight") == [
        L + "self_attention.linear_qkv.image.weight", L + "self_attention.linear_qkv.text.weight"]
    assert spec.from_dense(untied, L + "input_layernorm.weight") == [L + "input_layernorm.image.weight",
                                                                      L + "input_layernorm.text.weight"]
    assert spec.from_dense(untied, L + "pre_mlp_layernorm.weight") == [L + "pre_mlp_layernorm.image.weight",
                                                                        L + "pre_mlp_layernorm.text.weight"]
    assert spec.from_dense(shared, L + "input_layernorm.weight") == [L + "input_layernorm.weight"]
    assert spec.from_dense(shared, L + "mlp.linear_fc2.weight") == [L + "mlp.image.linear_fc2.weight",
                                                                    L + "mlp.text.linear_fc2.weight"]
    for key in ("language_model.embedding.word_embeddings.weight", "language_model.decoder.final_layernorm.weight",
                "language_model.output_layer.weight", "vision_model.decoder.layers.0.mlp.linear_fc1.weight"):
        assert spec.from_dense(untied, key) == [key]
