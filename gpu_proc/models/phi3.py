"""Phi-3 and Phi-4-mini (``Phi3ForCausalLM``): the Llama decoder whose checkpoint fuses q/k/v into ``qkv_proj``
and gate/up into ``gate_up_proj``, with a sliding window where the config sets one, partial rotary
embedding (Phi-4-mini) and LongRoPE scaling (the 128k models)."""

from __future__ import annotations

from collections.abc import Iterable

from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import LlamaForCausalLM, split_rows


@register("Phi3ForCausalLM")
class Phi3ForCausalLM(LlamaForCausalLM):
    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]) -> Iterable[tuple[str, object]]:
        hf = self.config.hf
        head_dim = self.config.head_dim
        q = hf["num_attention_heads"] * head_dim
        kv = (hf.get("num_key_value_heads") or hf["num_attention_heads"]) * head_dim
        size = hf["intermediate_size"]
        fused = {
            "qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
            "gate_up_proj": [("gate_proj", size), ("up_proj", size)],
        }
        return split_rows(weights, fused)
