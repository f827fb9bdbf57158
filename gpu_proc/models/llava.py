"""LLaVA-1.5: transformers' CLIP vision tower and two-layer projector before a Llama language model. An image
becomes one token per patch of the tower's chosen layer (the class token dropped, unless the strategy is "full")."""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc.layers.vision import VisionEncoder, rename, vision_config
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import LlamaForCausalLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Shard

# The language model's tensors: language_model.model.* in the first checkpoints, model.language_model.* later.
TEXT_PREFIXES = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
}
VISION_PREFIXES = {
    "vision_tower.vision_model.": "tower.",
    "model.vision_tower.vision_model.": "tower.",
    "vision_tower.": "tower.",
    "model.vision_tower.": "tower.",
    "multi_modal_projector.": "projector.",
    "model.multi_modal_projector.": "projector.",
}


class LlavaVision(nn.Module):
    """The CLIP tower and the projector of the model's ``config`` (transformers' LlavaConfig)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.layer, self.strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        self.tower = AutoModel.from_config(config.vision_config)
        self.projector = LlavaMultiModalProjector(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The projected features [images * tokens, hidden] of pixel values [images, 3, height, width]."""
        states = self.tower(pixels, output_hidden_states=True).hidden_states
        layers = [self.layer] if isinstance(self.layer, int) else self.layer
        chosen = [states[i][:, 1:] if self.strategy == "default" else states[i] for i in layers]
        return self.projector(torch.cat(chosen, dim=-1)).flatten(0, 1)


@register("LlavaForConditionalGeneration")
class LlavaForConditionalGeneration(LlamaForCausalLM):
    """The Llama language model, with its vision encoder beside it (``vision``)."""

    def __init__(self, mc: ModelConfig, shard: Shard, tp: TensorParallel) -> None:
        super().__init__(mc, shard, tp)
        self.vision = VisionEncoder(
            lambda: LlavaVision(vision_config(mc.hf, None)), VISION_PREFIXES, lambda module, pixels, _: module(pixels)
        )

    def checkpoint_tensors(self, weights):
        return rename(weights, TEXT_PREFIXES)
