"""Conversion building blocks (no model, no process group): fused-tensor helpers, ops, declarative
maps, streaming safetensors writer, atomic output folders, HF key renames, and the Mllama text map
against the cross_attention arch's reference functions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from megatron_vlm.conversion import hf_io, mapping
from megatron_vlm.conversion.mapping import (GATE_UP, KV, QKV, ConversionError, Pair, PadRows,
                                             Reshape, Rule, check_pairs, expand)


def _qkv_by_hand(q, k, v, nq, ng):
    d = k.shape[0] // ng
    rows = []
    per = nq // ng
    for g in range(ng):
        rows += [q[(g * per + h) * d:(g * per + h + 1) * d] for h in range(per)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(rows)


@pytest.mark.parametrize("nq,ng", [(4, 2), (4, 4), (8, 1), (6, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_layout_and_round_trip(nq, ng, bias):
    d, h = 3, 5
    shape = () if bias else (h,)
    q, k, v = torch.randn(nq * d, *shape), torch.randn(ng * d, *shape), torch.randn(ng * d, *shape)
    fused = mapping.fuse_qkv(q, k, v, nq, ng)
    assert torch.equal(fused, _qkv_by_hand(q, k, v, nq, ng))
    q2, k2, v2 = mapping.split_qkv(fused, nq, ng)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    assert QKV(nq, ng).hf_shapes(tuple(fused.shape)) == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]


def test_gate_up_global_and_tp_layouts():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    fc1 = mapping.fuse_gate_up(gate, up)
    assert torch.equal(fc1, torch.cat([gate, up]))
    shards = mapping.split_gate_up_tp(fc1, 2)  # rank r: [gate_r; up_r]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    assert torch.equal(mapping.merge_gate_up_tp(shards), fc1)
    assert [torch.equal(a, b) for a, b in zip(GATE_UP.to_hf(fc1), (gate, up))] == [True, True]


def test_kv_and_pad_and_reshape_ops():
    k, v = torch.randn(6, 4), torch.randn(6, 4)
    kv = KV(3).to_mcore([k, v])
    assert torch.equal(kv[2:4], v[0:2]) and torch.equal(kv[4:6], k[2:4])
    assert all(torch.equal(a, b) for a, b in zip(KV(3).to_hf(kv), (k, v)))
    emb = torch.randn(5, 2)
    padded = PadRows(5, 8).to_mcore([emb])
    assert padded.shape == (8, 2) and padded[5:].abs().sum() == 0
    assert torch.equal(PadRows(5, 8).to_hf(padded)[0], emb)
    with pytest.raises(ConversionError, match="expected 5 rows"):
        PadRows(5, 8).to_mcore([torch.randn(6, 2)])
    assert Reshape((4,), (1, 1, 4)).to_mcore([torch.ones(4)]).shape == (1, 1, 4)


def test_expand_and_check_pairs():
    rules = [Rule("decoder.layers.{i}.x", "layers.{j}.a"),
             Rule("decoder.layers.{i}.qkv", ("layers.{j}.q", "layers.{j}.k", "layers.{j}.v"), QKV(2, 1))]
    pairs = expand(rules, [(0, 3), (1, 4)], "m.", "h.")
    assert pairs[2] == Pair("m.decoder.layers.1.x", ("h.layers.4.a",))
    check_pairs(pairs)
    with pytest.raises(ConversionError, match="mapped twice"):
        check_pairs(pairs + [Pair("other", ("h.layers.3.a",))])
    with pytest.raises(ConversionError, match="takes 3 HF tensors"):
        check_pairs([Pair("x", ("a",), QKV(2, 1))])
    report = mapping.key_report("where", {"a", "b"}, {"c"})
    assert report.splitlines()[0] == "where: 2 missing and 1 unexpected key(s)"
    assert "  unexpected: c" in report


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_safetensors_writer(tmp_path, dtype):
    tensors = {f"t{i}": torch.randn(10 + i, 7).to(dtype) for i in range(6)}
    tensors["scalar"] = torch.tensor([1.5]).to(dtype)
    entries = [(k, tuple(t.shape), dtype) for k, t in tensors.items()]
    index = hf_io.write_safetensors_shards(tmp_path, entries, iter(tensors.items()), max_shard_bytes=700)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    on_disk = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert on_disk == index and set(index["weight_map"]) == set(tensors)
    for name, fname in index["weight_map"].items():
        with safe_open(str(tmp_path / fname), "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
    reader = hf_io.HFReader(tmp_path)
    assert reader.shape("t3") == (13, 7) and reader.dtype("t3") == dtype
    with pytest.raises(ConversionError, match="planned"):
        (tmp_path / "x").mkdir()
        hf_io.write_safetensors_shards(tmp_path / "x", entries[:1], iter([("t1", tensors["t1"])]))


def test_atomic_output_dir(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with hf_io.atomic_output_dir(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with hf_io.atomic_output_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(ConversionError, match="not empty .pass --overwrite"):
        with hf_io.atomic_output_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with hf_io.atomic_output_dir(target, overwrite=True) as tmp:
            raise RuntimeError("fail")
    assert (target / "a").read_text() == "1"  # untouched by a failed overwrite
    with hf_io.atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hf_key_renames_accept_both_transformers_layouts():
    from megatron_vlm.archs.cross_attention.hf_mllama import RENAME as MLLAMA
    from megatron_vlm.archs.joint_decoder.hf_llava import RENAME as LLAVA

    assert LLAVA("model.language_model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    assert LLAVA("lm_head.weight") == "language_model.lm_head.weight"
    assert LLAVA("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert LLAVA("model.multi_modal_projector.linear_1.bias") == "multi_modal_projector.linear_1.bias"
    assert LLAVA("language_model.model.norm.weight") == "language_model.model.norm.weight"
    assert MLLAMA("model.vision_model.class_embedding") == "vision_model.class_embedding"


def test_mllama_text_map_agrees_with_the_arch_reference():
    """mllama_text (the in-memory form used by the model tests) renames the declarative map's keys
    only: same tensors, and its export inverts the map."""
    from megatron_vlm.archs.cross_attention.config import CrossAttentionConfig
    from megatron_vlm.archs.cross_attention.hf_mllama import text_pairs
    from megatron_vlm.archs.cross_attention.hf_mllama_text import hf_text_to_megatron, megatron_to_hf_text
    from megatron_vlm.config import LanguageConfig, ModelConfig

    V = 40
    lang = LanguageConfig(num_layers=4, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=24, vocab_size=V + 8, unpadded_vocab_size=V)
    mc = ModelConfig(arch="cross_attention", language=lang)
    mc.cross_attention = CrossAttentionConfig(layers=[1, 3])  # the arch's section
    pairs = text_pairs(mc)
    g = torch.Generator().manual_seed(0)
    hf = {
        "language_model.model.embed_tokens.weight": torch.randn(V + 8, 16, generator=g),
        "language_model.lm_head.weight": torch.randn(V, 16, generator=g),
        "language_model.model.norm.weight": torch.randn(16, generator=g),
    }
    for i in range(4):
        h = f"language_model.model.layers.{i}."
        hf[h + "input_layernorm.weight"] = torch.randn(16, generator=g)
        hf[h + "post_attention_layernorm.weight"] = torch.randn(16, generator=g)
        for n, s in (("gate_proj", (24, 16)), ("up_proj", (24, 16)), ("down_proj", (16, 24))):
            hf[h + f"mlp.{n}.weight"] = torch.randn(*s, generator=g)
        a = h + ("cross_attn." if i in (1, 3) else "self_attn.")
        for n, s in (("q_proj", (16, 16)), ("k_proj", (8, 16)), ("v_proj", (8, 16)), ("o_proj", (16, 16))):
            hf[a + f"{n}.weight"] = torch.randn(*s, generator=g)
        if i in (1, 3):
            hf[a + "q_norm.weight"] = torch.randn(4, generator=g)
            hf[a + "k_norm.weight"] = torch.randn(4, generator=g)
            hf[h + "cross_attn_attn_gate"] = torch.randn(1, generator=g)
            hf[h + "cross_attn_mlp_gate"] = torch.randn(1, generator=g)
    ours = dict(mapping.hf_to_mcore(pairs, hf.__getitem__))
    ref = hf_text_to_megatron(hf, mc)
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    back = dict(mapping.mcore_to_hf(pairs, ours.__getitem__))
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    ref_back = megatron_to_hf_text(ref, mc, hf_vocab_size=V)
    assert torch.equal(ref_back["model.embed_tokens.weight"], back["language_model.model.embed_tokens.weight"])
