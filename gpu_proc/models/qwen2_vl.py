"""Qwen2-VL and Qwen2.5-VL: transformers' vision transformer (2D rotary, window attention in 2.5, a patch merger
into the language model's width) before a Qwen2 language model with multimodal rotary positions (M-RoPE): a text
token's three positions (time, height, width) are equal, an image token's are its place in the image's grid."""

from __future__ import annotations

import dataclasses
import types

import torch

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.layers.rotary import RotaryEmbedding
from tristream.gpu_proc.layers.vision import VisionEncoder, packed_attention, rename, vision_config
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import Qwen2ForCausalLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.protocol import ImageInput
from tristream.sharding import Shard

# transformers 5 names the language model's tensors model.language_model.*; earlier checkpoints model.*
TEXT_PREFIXES = {"model.language_model.": "model."}


@register("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM):
    """The language model, with its vision encoder beside it (``vision``) and M-RoPE positions for prompts with
    images (``rope_index``); a batch's prompt rows rotate by ``ForwardBatch.mrope_positions``."""

    def __init__(self, mc: ModelConfig, shard: Shard, tp: TensorParallel) -> None:
        super().__init__(mc, shard, tp)
        rope = mc.hf.get("rope_parameters") or mc.hf.get("rope_scaling") or {}
        self.mrope_section = rope.get("mrope_section", [16, 24, 24])
        self.merge = mc.hf["vision_config"].get("spatial_merge_size", 2)
        self.vision = VisionEncoder(
            lambda: _packed(_vision_class(mc.architecture)._from_config(vision_config(mc.hf))),
            {"visual.": "", "model.visual.": ""},
            lambda module, pixels, images: (
                module(pixels, grid_thw=torch.tensor([i.grid for i in images], device=pixels.device)).pooler_output
            ),
        )

    def checkpoint_tensors(self, weights):
        return rename(weights, TEXT_PREFIXES)

    def rope_index(self, num_tokens: int, images: list[ImageInput]) -> tuple[torch.Tensor, int]:
        """The M-RoPE positions [3, num_tokens] of a prompt with ``images``, and what a later token at position p
        adds to p. Text continues one past the largest position of the image before it."""
        positions = torch.empty(3, num_tokens, dtype=torch.int64)
        done = position = 0
        for image in images:
            positions[:, done : image.offset] = torch.arange(position, position + image.offset - done)
            position += image.offset - done
            t, h, w = image.grid[0], image.grid[1] // self.merge, image.grid[2] // self.merge
            span = positions[:, image.offset : image.offset + image.length]
            span[0] = position + torch.arange(t).repeat_interleave(h * w)
            span[1] = position + torch.arange(h).repeat_interleave(w).repeat(t)
            span[2] = position + torch.arange(w).repeat(t * h)
            position += max(h, w)
            done = image.offset + image.length
        positions[:, done:] = torch.arange(position, position + num_tokens - done)
        return positions, position - done

    def rotary_of(self, batch: ForwardBatch) -> tuple[RotaryEmbedding, ForwardBatch]:
        if batch.mrope_positions is None:
            return self.rotary, batch
        rows = torch.arange(batch.mrope_positions.shape[1], device=batch.positions.device)
        return self.rotary.multimodal(batch.mrope_positions, self.mrope_section), dataclasses.replace(
            batch, positions=rows
        )


def _packed(tower: torch.nn.Module) -> torch.nn.Module:
    """``tower`` with each block's attention over all its windows (or images) in one call (``packed_attention``)."""
    for block in tower.blocks:
        block.attn.forward = types.MethodType(_attention, block.attn)
    return tower


def _attention(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings, **_) -> torch.Tensor:
    """The forward pass of transformers' Qwen2-VL vision attention (``self``), packed."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    return self.proj(packed_attention(q, k, v, cu_seqlens, self.scaling).reshape(n, -1))


def _vision_class(architecture: str) -> type:
    if architecture == "Qwen2VLForConditionalGeneration":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return Qwen2_5_VisionTransformerPretrainedModel
