"""The parts of a Hugging Face ``config.json`` that the engine uses."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from tristream.pooling import sentence_transformers_pooling
from tristream.quantization import QuantSpec


@dataclass
class ModelConfig:
    """Shapes and constants of a decoder-only transformer; ``architecture`` names its model family (``gpu_proc/models``).

    ``quant`` is how the decoder's linear layers hold their weights, once the engine has resolved it from
    ``quantization_config`` and its ``quantization`` argument (``tristream.quantization.quant_spec``).
    A mixture-of-experts model routes each token to ``num_experts_per_tok`` of its ``num_experts`` experts, each
    an MLP of ``moe_intermediate_size``; a shared expert (``shared_expert_intermediate_size``) sees every token.
    ``num_kv_heads`` and ``head_dim`` shape the KV cache: under multi-head latent attention (DeepSeek-V2/V3) it
    holds every head's whole K and V, so there are ``num_heads`` of them, as wide as ``_cache_heads`` says.
    ``hf`` is the whole ``config.json``, for the fields only one family reads. An ``embedding_only`` model has
    no LM head: a base model (``architectures`` names ``XModel``, built as ``XForCausalLM``'s layers) or a
    sentence-transformers model (its ``modules.json`` has a ``Pooling`` module); it embeds and never generates.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: list[int]
    dtype: str
    quantization_config: dict | None = None
    quant: QuantSpec | None = None
    partial_rotary_factor: float = 1.0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    embedding_only: bool = False
    hf: dict = field(default_factory=dict, repr=False, compare=False)

    def sliding_window(self, layer: int) -> int:
        """The sliding window of layer ``layer``'s attention, or 0: the config's ``sliding_window`` where its
        ``layer_types`` mark the layer "sliding_attention", or on every layer without ``layer_types``
        (Mistral, Phi-3), unless ``use_sliding_window`` is false (Qwen2)."""
        size = self.hf.get("sliding_window") or 0
        types = self.hf.get("layer_types")
        if types:
            return size if types[layer] == "sliding_attention" else 0
        return 0 if self.hf.get("use_sliding_window") is False else size

    def kv_window(self) -> int:
        """How far back any layer's attention reads: the largest sliding window, or 0 where a layer sees its
        whole context. Pages wholly before it are never read again."""
        windows = [self.sliding_window(layer) for layer in range(self.num_layers)]
        return 0 if 0 in windows else max(windows)

    def attention_span(self, max_len: int) -> int:
        """The most positions one query attends to in sequences of up to ``max_len`` tokens."""
        return min(max_len, self.kv_window() or max_len)

    @classmethod
    def load(cls, model_dir: str) -> ModelConfig:
        """Read ``config.json`` (and ``generation_config.json`` for EOS ids). A vision-language model's language
        model fields may sit in its ``text_config``."""
        with open(os.path.join(model_dir, "config.json")) as f:
            raw = json.load(f)
        text = raw.get("text_config")
        if text:
            raw = {**raw, **text, "model_type": raw.get("model_type", text.get("model_type"))}
        arch = _architecture(raw)
        from tristream.gpu_proc.models import architectures

        causal_lm = f"{arch.removesuffix('Model')}ForCausalLM"
        base_model = arch.endswith("Model") and causal_lm in architectures()
        if base_model:
            arch = causal_lm
        if arch not in architectures():
            raise ValueError(f"unsupported architecture {arch!r} in {model_dir}; supported: {sorted(architectures())}")
        rope = raw.get("rope_parameters") or {}
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and "original_max_position_embeddings" in raw:  # Phi-3 keeps it beside rope_scaling
            scaling = {"original_max_position_embeddings": raw["original_max_position_embeddings"], **scaling}
        if scaling and scaling.get("type") == "su":  # Phi-3's first name for LongRoPE
            scaling = {**scaling, "type": "longrope"}
        if scaling and scaling.get("rope_type", scaling.get("type")) in ("mrope", "default"):
            scaling = None  # Qwen2-VL's multimodal rope: default frequencies, split by its mrope_section
        num_heads = raw["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            **_cache_heads(raw),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            eos_token_ids=_eos_ids(model_dir, raw),
            dtype=raw.get("torch_dtype") or raw.get("dtype") or "float32",
            quantization_config=raw.get("quantization_config"),
            partial_rotary_factor=rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)),
            **_experts(raw),
            embedding_only=base_model or sentence_transformers_pooling(model_dir)[0] is not None,
            hf=raw,
        )


def _architecture(raw: dict) -> str:
    """The first of ``architectures``; without that list, the causal LM class that transformers has for ``model_type``."""
    if raw.get("architectures"):
        return raw["architectures"][0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(raw.get("model_type"), raw.get("model_type"))


def _experts(raw: dict) -> dict[str, int]:
    """The mixture-of-experts shapes of ``raw`` under the names each family gives them (none for a dense model)."""
    experts = (
        raw.get("num_experts")
        or raw.get("num_local_experts")
        or raw.get("moe_num_experts")
        or raw.get("n_routed_experts")
    )
    if not experts:
        return {}
    size = raw.get("moe_intermediate_size") or raw["intermediate_size"]
    shared_experts = raw.get("moe_num_shared_experts") or raw.get("n_shared_experts") or 0
    shared = raw.get("shared_expert_intermediate_size") or size * shared_experts
    return dict(
        num_experts=experts,
        num_experts_per_tok=raw.get("num_experts_per_tok") or raw.get("moe_k") or 2,
        moe_intermediate_size=size,
        shared_expert_intermediate_size=shared,
    )


def _cache_heads(raw: dict) -> dict[str, int]:
    """``num_kv_heads`` and ``head_dim`` of the KV cache. Under multi-head latent attention (``kv_lora_rank`` set)
    it holds every query head's K and V, zero-padded to one width: the next power of two (at least 16) that holds
    both the q/k head (``qk_nope_head_dim + qk_rope_head_dim``) and ``v_head_dim``, as the attention kernels need."""
    heads = raw["num_attention_heads"]
    if raw.get("kv_lora_rank") is None:
        return dict(
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        )
    width = max(raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"], raw["v_head_dim"], 16)
    return dict(num_kv_heads=heads, head_dim=1 << (width - 1).bit_length())


def _eos_ids(model_dir: str, raw: dict) -> list[int]:
    eos = raw.get("eos_token_id")
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id", eos)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
