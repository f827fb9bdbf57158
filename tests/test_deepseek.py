"""DeepSeek-V2 and V3 (multi-head latent attention, grouped expert routing) against transformers on tiny random
weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tests.conftest import hf_logits, random_hf_model, run_ours  # pytest has imported the conftest under this name
from tristream.gpu_proc.weights import dummy_weights
from tristream.model_config import ModelConfig
from tristream.sharding import shard_model

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    moe_intermediate_size=32,
)
CONFIGS = {
    # No query bottleneck, q/k heads wider than v, softmax routing to 3 experts of the 2 best of 4 groups.
    "v2": dict(
        model_type="deepseek_v2",
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_shared_experts=2,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    ),
    # A query bottleneck, v wider than q/k, yarn rope, and sigmoid routing with score correction and renormalization
    # to the 4 experts of the 2 best of 8 groups.
    "v3": dict(
        model_type="deepseek_v3",
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=20,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=8,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.7,
        },
    ),
}


def make_model(tmp_path, name: str, **overrides):
    """transformers' model of ``CONFIGS[name]`` with N(0, 0.2) weights and score corrections, saved."""
    path = tmp_path / name
    return random_hf_model(path, {**TINY, **CONFIGS[name], **overrides}), str(path)


def compare(ours: list[torch.Tensor], model, prompts: list[list[int]], steps: int, label: str) -> None:
    for i, prompt in enumerate(prompts):
        for step, ref in enumerate(hf_logits(model, prompt, steps)):
            err = (ours[step][i] - ref).norm() / ref.norm()
            assert err < 1e-5, f"{label}: prompt {i} step {step}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    model, path = make_model(tmp_path, name)
    # A multi-token-prediction layer after the decoder's, as DeepSeek-V3 checkpoints hold, is skipped.
    save_file({"model.layers.2.eh_proj.weight": torch.zeros(64, 128)}, f"{path}/mtp.safetensors")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 7, 40)]
    for page_size in (1, 16):
        compare(run_ours(path, prompts, 4, page_size), model, prompts, 4, f"{name} page_size={page_size}")


def test_v3_rotary_pairs_halves_without_rope_interleave(tmp_path):
    model, path = make_model(tmp_path, "v3", rope_interleave=False)
    prompts = [[5, 17, 300, 2, 9, 44, 61, 7]]
    compare(run_ours(path, prompts, 3, 16), model, prompts, 3, "v3 rope_interleave=False")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dummy_weights_are_a_whole_checkpoint_that_transformers_runs_alike(tmp_path, name):
    _, path = make_model(tmp_path, name)
    weights = dict(dummy_weights(ModelConfig.load(path), torch.float32, torch.device("cpu"), seed=0))
    (tmp_path / "dummy").mkdir()
    shutil.copy(f"{path}/config.json", tmp_path / "dummy")
    save_file(weights, tmp_path / "dummy" / "model.safetensors", metadata={"format": "pt"})
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "dummy", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set()), info
    prompts = [[5, 17, 300, 2], [9]]
    compare(run_ours(path, prompts, 3, 16, load_format="dummy"), model, prompts, 3, f"{name} dummy")


def test_the_cache_holds_every_head_whole_and_one_rank_only(tmp_path):
    _, path = make_model(tmp_path, "v3")
    mc = ModelConfig.load(path)
    assert (mc.num_kv_heads, mc.head_dim, mc.num_experts, mc.shared_expert_intermediate_size) == (4, 32, 16, 32)
    with pytest.raises(ValueError, match="cannot be split over ranks"):
        shard_model(mc, 2, 0)
