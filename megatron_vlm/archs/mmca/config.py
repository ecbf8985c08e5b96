"""The ``mmca`` arch's config section ``model.mmca`` and its rules.

YAML (every key optional)::

    model:
      arch: mmca
      mmca:
        combine: sum     # how a text query combines its image and text branches: sum | mean

``sum`` (DeepSpeed-VisualChat's choice): the two normalised branches are added, so a text token that
sees images puts total weight 2 on its keys. ``mean``: the sum divided by the number of non-empty
branches (total weight 1; a text token before any image keeps its plain causal attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vlm.config import Config, ConfigError

COMBINES = ("sum", "mean")


@dataclass
class MMCAConfig:
    combine: str = "sum"


def validate(cfg: Config) -> None:
    combine = cfg.model.mmca.combine
    if combine not in COMBINES:
        raise ConfigError(f"model.mmca.combine={combine!r}: allowed {list(COMBINES)}")
