"""The inputs of one forward pass over a ragged batch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class ForwardBatch:
    """Flattened tokens of all scheduled sequences plus their attention metadata, on the device.

    Sequence b owns rows ``qo_indptr[b]:qo_indptr[b+1]``, has ``seq_lens[b]`` tokens
    of context after this step, and its KV lives in the pages ``block_table[b]``.
    The model returns logits for ``logit_rows``: the rows that sample, first.
    ``decode`` says every sequence has one new token; ``num_splits`` is the
    split-KV factor of the decode kernel. With LoRA adapters in the batch, ``lora_rows``
    lists the rows that have one, grouped by adapter slot: slot s's are
    ``lora_rows[lora_indptr[s]:lora_indptr[s+1]]``, at most ``lora_max_rows`` of them.
    A batch with prompt tokens of a model with multimodal rotary positions has them in ``mrope_positions``
    [3, tokens] (``positions`` then holds their first row); the embeddings of rows ``image_rows`` (image tokens)
    are ``image_embeds``.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    qo_indptr: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    logit_rows: torch.Tensor
    max_q_len: int
    decode: bool
    num_splits: int = 1
    lora_rows: torch.Tensor | None = None
    lora_indptr: torch.Tensor | None = None
    lora_max_rows: int = 0
    mrope_positions: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    @cached_property
    def host_meta(self) -> tuple[list[list[int]], list[int], list[int]]:
        """(block tables, seq_lens, qo_indptr) as lists, for the torch reference attention."""
        return self.block_table.tolist(), self.seq_lens.tolist(), self.qo_indptr.tolist()
