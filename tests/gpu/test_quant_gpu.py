"""Quantized models on the GPU: the engine with fp8 weights (per channel and in blocks), 4-bit weights and an fp8
KV cache, under CUDA graphs, against the same random weights in bf16.

Every request of a quantized engine follows the bf16 engine's greedy tokens for most steps, its log-probabilities
near bf16's, and CUDA graphs change nothing: an eager engine gives the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from tristream import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
VARIANTS = {  # name: (quantization, kv_cache_dtype, block-wise fp8)
    "fp8": ("fp8", "auto", False),
    "fp8-block": ("fp8", "auto", True),
    "int4": ("awq", "auto", False),
    "kv-fp8": (None, "fp8", False),
}
PROMPTS = [list(range(7, 7 + n)) for n in (1, 9, 130)] + [[5] * 40]


def folder(tmp_path, block: bool) -> str:
    config = (
        {**CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}} if block else CONFIG
    )
    path = tmp_path / ("block" if block else "plain")
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def greedy(path: str, quantization: str | None, kv: str, eager: bool = False) -> list[tuple[list, list]]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    with LLM(
        model=path, load_format="dummy", quantization=quantization, kv_cache_dtype=kv, enforce_eager=eager,
        max_model_len=512, skip_tokenizer_init=True, log_level="WARNING",
    ) as llm:  # fmt: skip
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_quantized_engine_follows_bf16_and_graphs_change_nothing(tmp_path, name):
    quantization, kv, block = VARIANTS[name]
    base = greedy(folder(tmp_path, False), None, "auto")
    path = folder(tmp_path, block)
    ours, eager = greedy(path, quantization, kv), greedy(path, quantization, kv, eager=True)
    assert [t for t, _ in ours] == [t for t, _ in eager], "CUDA graphs change the tokens"
    for (tokens, logprobs), (want, want_logprobs) in zip(ours, base):
        shared = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(want))
        assert shared >= 4, f"{name}: the greedy tokens part from bf16's after {shared}"
        deltas = [
            abs(step[t] - ref[t])
            for step, ref in zip(logprobs[:shared], want_logprobs[:shared])
            for t in ref
            if t in step
        ]
        assert sum(deltas) / len(deltas) < 0.1, f"{name}: mean |dlogprob| {sum(deltas) / len(deltas):.3f}"
