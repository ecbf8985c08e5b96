"""model.mmca: a bad ``combine`` is one line naming the field, the value and the allowed values; the
section loads from YAML-shaped dicts; the arch registers with the joint-decoder model and layout."""

from __future__ import annotations

import pytest

from megatron_vlm import config as C
from megatron_vlm.config import Config, ConfigError, validate


def mmca(**changes) -> Config:
    cfg = Config()
    cfg.model.arch = "mmca"
    for path, value in changes.items():
        C.set_key(cfg, path, value)
    return cfg


@pytest.mark.parametrize("value", ["max", "Sum", "", None, 1])
def test_bad_combine_is_one_line(value):
    with pytest.raises(ConfigError) as e:
        validate(mmca(**{"model.mmca.combine": value}), world_size=1)
    assert str(e.value) == f"model.mmca.combine={value!r}: allowed ['sum', 'mean']", str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", ["sum", "mean"])
def test_valid_combine(value):
    cfg = mmca(**{"model.mmca.combine": value})
    validate(cfg, world_size=1)
    assert cfg.model.mmca.combine == value


def test_default_and_registration():
    from megatron_vlm.archs import get_arch
    from megatron_vlm.archs.mmca.config import MMCAConfig
    from megatron_vlm.data.layout import TokenLayout

    cfg = mmca()
    assert isinstance(cfg.model.mmca, MMCAConfig) and cfg.model.mmca.combine == "sum"
    validate(cfg, world_size=1)
    spec = get_arch("mmca")
    assert spec.token_layout is TokenLayout.INLINE and spec.homogeneous_layers and not spec.experts
    assert spec.model_class.endswith("JointDecoderVLM")


def test_unknown_mmca_key_is_one_line():
    with pytest.raises(ConfigError) as e:
        C.from_dict({"model": {"arch": "mmca", "mmca": {"combin": "sum"}}})
    assert "combin" in str(e.value) and "\n" not in str(e.value)
