"""The inputs of one forward pass over a ragged batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Flattened tokens of all scheduled sequences plus their attention metadata.

    Sequence b owns rows ``qo_indptr[b]:qo_indptr[b+1]``, has ``seq_lens[b]``
    tokens of context after this step, and its KV lives in ``block_tables[b]``.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    qo_indptr: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: torch.Tensor
