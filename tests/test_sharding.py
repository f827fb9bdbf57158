"""How tensor parallelism splits a model across ranks."""

from __future__ import annotations

import dataclasses

import pytest

from tristream.model_config import ModelConfig
from tristream.sharding import place, shard_model

BASE = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=1e4,
    rope_scaling=None,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    attention_bias=False,
    eos_token_ids=[2],
    dtype="bfloat16",
)


def shards(mc: ModelConfig, size: int):
    return [shard_model(mc, size, rank) for rank in range(size)]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_cover_every_head_column_and_row_once(size):
    parts = shards(BASE, size)
    for field, total in (("q_heads", 9), ("kv_heads", 3), ("intermediate", 1536), ("vocab", 49152)):
        covered = [i for s in parts for i in getattr(s, field)]
        assert covered == list(range(total)), field
    assert all(s.vocab_rows * size >= 49152 for s in parts)


def test_kv_heads_split_unevenly_keep_their_query_groups():
    first, second = shards(BASE, 2)
    assert (first.kv_heads, first.q_heads) == (range(0, 2), range(0, 6))
    assert (second.kv_heads, second.q_heads) == (range(2, 3), range(6, 9))
    local = second.local_config(BASE)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (3, 1, 768, 49152)


def test_fewer_kv_heads_than_ranks_are_replicated():
    mc = dataclasses.replace(BASE, num_heads=8, num_kv_heads=2)
    parts = shards(mc, 4)
    assert [s.kv_heads for s in parts] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [s.q_heads for s in parts] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


def test_a_vocabulary_that_does_not_divide_is_padded_on_the_last_rank():
    parts = shards(dataclasses.replace(BASE, vocab_size=1001), 2)
    assert [(s.vocab, s.vocab_rows) for s in parts] == [(range(0, 501), 501), (range(501, 1001), 501)]


@pytest.mark.parametrize(
    ("heads", "kv", "size", "message"),
    [
        (8, 2, 3, "multiple of the KV heads"),
        (6, 2, 4, "divide the attention heads"),
        (4, 4, 8, "more than the model's 4 attention heads"),
        (8, 8, 0, "must be an int >= 1"),
    ],
)
def test_splits_that_do_not_fit_say_why(heads, kv, size, message):
    with pytest.raises(ValueError, match=message):
        shard_model(dataclasses.replace(BASE, num_heads=heads, num_kv_heads=kv), size, 0)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_the_weight_table_places_fused_parts_side_by_side_and_each_rows_once(size):
    from tristream.gpu_proc.models.llama import WEIGHTS

    def rows(p):
        return list(range(p.src.start, p.src.stop))

    covered: dict[str, list[int]] = {"q_proj": [], "k_proj": [], "v_proj": [], "o_proj": [], "lm_head": []}
    for shard in shards(BASE, size):
        local = shard.local_config(BASE)
        q, k, v, o = (place(f"model.layers.3.self_attn.{m}.weight", WEIGHTS, BASE, shard) for m in list(covered)[:4])
        assert {q.param, k.param, v.param} == {"layers.3.self_attn.qkv_proj.weight"}
        assert (q.part, k.part, v.part, q.dim, o.dim) == (0, 1, 2, 0, 1)
        assert (q.dst.start, q.dst.stop, k.dst.stop, v.dst.stop) == (
            0,
            k.dst.start,
            v.dst.start,
            64 * (local.num_heads + 2 * local.num_kv_heads),
        )
        head = place("lm_head.weight", WEIGHTS, BASE, shard)
        assert (head.param, head.dst) == ("lm_head.weight", slice(0, len(shard.vocab)))
        for module, p in zip(covered, (q, k, v, o, head)):
            covered[module] += rows(p)
    assert covered == {
        "q_proj": list(range(576)),
        "k_proj": list(range(192)),
        "v_proj": list(range(192)),
        "o_proj": list(range(576)),
        "lm_head": list(range(49152)),
    }
    norm = place("model.layers.0.input_layernorm.weight", WEIGHTS, BASE, shards(BASE, size)[-1])
    assert (norm.param, norm.src, norm.dst) == ("layers.0.input_layernorm.weight", slice(None), slice(None))
