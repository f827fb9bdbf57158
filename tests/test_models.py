"""Each supported architecture against transformers on the same (tiny, random) weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import hf_logits, random_hf_model, run_ours  # pytest has imported the conftest under this name

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
)
ARCHS = {
    "llama3.1-rope": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2-bias": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0),
    "qwen3-qknorm": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32, rope_theta=1000000.0),
    "llama-tied": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True),
    "qwen3-moe-top8": dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=8,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "qwen2-moe-shared": dict(
        model_type="qwen2_moe",
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
    ),
    "mixtral": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2
    ),
    "ernie4.5-moe": dict(
        model_type="ernie4_5_moe",
        architectures=["Ernie4_5_MoeForCausalLM"],
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=32,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        tie_word_embeddings=True,
    ),
    "ernie4.5": dict(model_type="ernie4_5", architectures=["Ernie4_5ForCausalLM"], head_dim=32),
    "mistral-window": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=24),
    "gemma2": dict(
        model_type="gemma2",
        architectures=["Gemma2ForCausalLM"],
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        tie_word_embeddings=True,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        num_hidden_layers=3,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=24,
        sliding_window_pattern=3,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
        tie_word_embeddings=True,
    ),
    "glm4": dict(model_type="glm4", architectures=["Glm4ForCausalLM"], head_dim=32, attention_bias=True),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], sliding_window=48),
    "phi3-longrope-partial": dict(
        model_type="phi3",
        architectures=["Phi3ForCausalLM"],
        partial_rotary_factor=0.75,
        max_position_embeddings=1024,
        original_max_position_embeddings=256,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5],
            "long_factor": [1.5, 2.0, 3.0, 4.0, 5.0, 6.0],
        },
    ),
    "olmo2": dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"]),
}


def make_model(tmp_path, name: str):
    return random_hf_model(tmp_path / name, {**TINY, **ARCHS[name]}), str(tmp_path / name)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("page_size", [1, 16])
def test_logits_match_transformers(tmp_path, name, page_size):
    model, path = make_model(tmp_path, name)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 7, 40, 70)]
    steps = 6
    ours = run_ours(path, prompts, steps, page_size)
    for i, prompt in enumerate(prompts):
        ref = hf_logits(model, prompt, steps)
        for step in range(steps + 1):
            got = ours[step][i]
            err = (got - ref[step]).norm() / ref[step].norm()
            assert err < 1e-5, f"{name}: prompt {i} step {step}: relative error {err:.2e}"


def test_dummy_weights_need_only_a_config(tmp_path):
    make_model(tmp_path, "qwen3-qknorm")
    (tmp_path / "dummy").mkdir()
    shutil.copy(tmp_path / "qwen3-qknorm" / "config.json", tmp_path / "dummy" / "config.json")
    logits = run_ours(str(tmp_path / "dummy"), [[1, 2, 3]], 2, 16, load_format="dummy")
    assert all(torch.isfinite(x).all() for x in logits)
    assert logits[0].std() > 0


def test_a_family_that_cannot_split_refuses_tensor_parallelism_before_any_process(tmp_path):
    from tristream.model_config import ModelConfig
    from tristream.sharding import shard_model

    _, path = make_model(tmp_path, "olmo2")
    mc = ModelConfig.load(path)
    assert shard_model(mc, 1, 0).q_heads == range(4)
    with pytest.raises(ValueError, match="Olmo2ForCausalLM cannot be split over ranks"):
        shard_model(mc, 2, 0)


def test_a_quantized_checkpoint_of_fused_projections_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = make_model(tmp_path, "phi3")
    tensors = load_file(f"{path}/model.safetensors")
    for name in [n for n in tensors if n.endswith("qkv_proj.weight") or n.endswith("gate_up_proj.weight")]:
        rows, cols = tensors[name].shape
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[name.replace("weight", "weight_scale_inv")] = torch.ones(rows // 32, cols // 32)
    save_file(tensors, f"{path}/model.safetensors")
    raw = json.loads(open(f"{path}/config.json").read())
    raw["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    open(f"{path}/config.json", "w").write(json.dumps(raw))
    with pytest.raises(ValueError, match="quantized checkpoints that fuse (qkv|gate_up)_proj are not supported"):
        run_ours(path, [[1, 2]], 0, 16)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        run_ours(str(tmp_path), [[1]], 0, 16, load_format="dummy")


# Families whose checkpoints hold fused projections, which our dummy weights give unfused.
FUSED_IN_CHECKPOINT = {
    "phi3": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
    "glm4": {"gate_up_proj": ["gate_proj", "up_proj"]},
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_dummy_weights_are_a_whole_checkpoint_that_transformers_runs_alike(tmp_path, name):
    from safetensors.torch import save_file

    from tristream.gpu_proc.weights import dummy_weights
    from tristream.model_config import ModelConfig

    _, path = make_model(tmp_path, name)
    weights = dict(dummy_weights(ModelConfig.load(path), torch.float32, torch.device("cpu"), seed=0))
    for fused, parts in FUSED_IN_CHECKPOINT.get(ARCHS[name]["model_type"], {}).items():
        for key in [k for k in weights if f".{parts[0]}." in k]:
            pieces = [weights.pop(key.replace(parts[0], part)) for part in parts]
            weights[key.replace(parts[0], fused)] = torch.cat(pieces)
    (tmp_path / "dummy").mkdir()
    shutil.copy(f"{path}/config.json", tmp_path / "dummy")
    save_file(weights, tmp_path / "dummy" / "model.safetensors", metadata={"format": "pt"})
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "dummy", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set()), info
    prompts = [[5, 17, 300, 2], [9]]
    ours = run_ours(path, prompts, 3, 16, load_format="dummy")
    for i, prompt in enumerate(prompts):
        for step, ref in enumerate(hf_logits(model, prompt, 3)):
            err = (ours[step][i] - ref).norm() / ref.norm()
            assert err < 1e-5, f"{name}: prompt {i} step {step}: relative error {err:.2e}"


def test_the_registry_knows_every_family_without_importing_torch(model_dir):
    import subprocess
    import sys

    from tristream.gpu_proc.models import _MODELS, architectures, model_class

    for name, module in architectures().items():
        assert model_class(name).__module__ == f"tristream.gpu_proc.models.{module}"
    assert set(_MODELS) == set(architectures())
    check = (
        "import sys; from tristream.model_config import ModelConfig; "
        f"print(ModelConfig.load({model_dir!r}).architecture, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["LlamaForCausalLM", "False"]
