"""model.moma: every bad value is one line naming the field; the numbers the arch derives from the
section (expert groups, k_e, layer indices, megatron's MoE fields)."""

from __future__ import annotations

import pytest

from megatron_vlm import config as C
from megatron_vlm.archs.moma import transformer_config
from megatron_vlm.archs.moma.config import expert_groups, moma_layer_indices, tokens_per_expert
from megatron_vlm.config import Config, ConfigError, validate


def moma(**changes) -> Config:
    cfg = Config()
    cfg.model.arch = "moma"
    cfg.model.language.num_layers = 4
    for path, value in changes.items():
        C.set_key(cfg, path, value)
    return cfg


BAD = {  # id: (changes, world size, exact start of the message)
    "experts_missing_modality": ({"model.moma.experts": {"image": 2}}, 1,
                                 "model.moma.experts={'image': 2}: needs one count for each of ['image', 'text']"),
    "experts_zero": ({"model.moma.experts": {"image": 0, "text": 2}}, 1,
                     "model.moma.experts.image=0: must be a positive integer"),
    "capacity_above_one": ({"model.moma.capacity_factor": 1.5}, 1,
                           "model.moma.capacity_factor=1.5: must be null (1/experts of the group) or a number in (0, 1]"),
    "capacity_per_modality": ({"model.moma.capacity_factor": {"image": 0.5, "text": 0}}, 1,
                              "model.moma.capacity_factor.text=0: must be null"),
    "capacity_unknown_key": ({"model.moma.capacity_factor": {"audio": 0.5}}, 1,
                             "model.moma.capacity_factor={'audio': 0.5}: keys must be among ['image', 'text']"),
    "layers_out_of_range": ({"model.moma.layers": [0, 4]}, 1,
                            "model.moma.layers=[0, 4]: must be distinct indices in [0, model.language.num_layers=4)"),
    "layers_word": ({"model.moma.layers": "some"}, 1, "model.moma.layers='some': allowed 'all'"),
    "layers_every_zero": ({"model.moma.layers": {"every": 0}}, 1, "model.moma.layers={'every': 0}: allowed 'all'"),
    "eval_routing": ({"model.moma.eval_routing": "topk"}, 1,
                     "model.moma.eval_routing='topk': allowed ['aux', 'expert_choice']"),
    "dispatcher": ({"model.moma.dispatcher": "deepep"}, 1,
                   "model.moma.dispatcher='deepep': allowed ['alltoall', 'allgather']"),
    "aux_coeff": ({"model.moma.aux_router.loss_coeff": -1.0}, 1,
                  "model.moma.aux_router.loss_coeff=-1.0: must be a number >= 0"),
    "ep_divides_experts": ({"model.moma.experts": {"image": 2, "text": 1}, "parallel.expert_model_parallel_size": 2}, 2,
                           "parallel.expert_model_parallel_size=2: must divide the 3 experts of model.moma.experts"),
    "tp_needs_sp": ({"parallel.tensor_model_parallel_size": 2}, 2,
                    "parallel.tensor_model_parallel_size=2 with moma: needs parallel.sequence_parallel=true"),
    "tp_times_ep_vs_world": ({"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
                              "parallel.expert_model_parallel_size": 2}, 2,
                             "parallel.expert_model_parallel_size=2: tensor x expert parallel = 4 must divide world size"),
    "ep_without_experts": ({"model.arch": "joint_decoder", "parallel.expert_model_parallel_size": 2}, 2,
                           "parallel.expert_model_parallel_size=2: only archs with experts take it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_moma_config_is_one_line(case):
    changes, world, expected = BAD[case]
    with pytest.raises(ConfigError) as e:
        validate(moma(**changes), world_size=world)
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_valid_moma_configs():
    validate(moma(), world_size=1)
    validate(moma(**{"parallel.expert_model_parallel_size": 2}), world_size=2)
    validate(moma(**{"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
                     "parallel.expert_model_parallel_size": 2}), world_size=4)
    validate(moma(**{"model.moma.capacity_factor": {"image": 0.5}, "model.moma.layers": {"every": 2}}), world_size=1)


def test_groups_interleave_so_each_ep_rank_holds_both_modalities():
    groups = expert_groups(moma().model.moma)
    assert groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for rank in range(2):  # megatron's contiguous blocks of 4 per EP rank
        block = set(range(4 * rank, 4 * rank + 4))
        assert all(block & set(g) for g in groups)
    assert expert_groups(moma(**{"model.moma.experts": {"image": 1, "text": 3}}).model.moma) == [[0], [1, 2, 3]]


def test_tokens_per_expert_and_layers():
    assert tokens_per_expert(10, 4, None) == 3          # ceil(10 / 4)
    assert tokens_per_expert(12, 3, None) == 4
    assert tokens_per_expert(3, 3, 1 / 3) == 1          # no float round-up to 2
    assert tokens_per_expert(5, 2, 1.0) == 5 and tokens_per_expert(0, 2, None) == 0
    assert moma_layer_indices(moma(**{"model.moma.layers": {"every": 2}}).model) == [0, 2]
    assert moma_layer_indices(moma(**{"model.moma.layers": [3, 1]}).model) == [1, 3]


def test_megatron_moe_fields_neutralise_top_k_assumptions():
    f = transformer_config(moma(**{"model.moma.experts": {"image": 2, "text": 3}}).model)
    assert f["num_moe_experts"] == 5 and f["moe_router_topk"] == 3
    assert f["moe_router_load_balancing_type"] == "none" and f["moe_aux_loss_coeff"] == 0.0
    assert f["moe_expert_capacity_factor"] is not None and not f["moe_pad_expert_input_to_capacity"]
    assert not f["moe_apply_probs_on_input"] and f["moe_router_score_function"] == "sigmoid"
    assert f["moe_layer_freq"] == [1, 1, 1, 1]
