"""What the gpu_proc keeps of each slot between steps, and the forward batch of a step built from it."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.images import SlotImages, splice_embeddings
from tristream.gpu_proc.upload import upload, upload_named
from tristream.kernels.attention import choose_num_splits
from tristream.protocol import BatchPlan, BeamFork, NewSequence


@dataclass
class Sequence:
    """What the gpu_proc knows of one slot: all its tokens, how many have KV, its pages.

    ``prompt_logprobs`` (top k) is set while the slot still owes prompt logprobs
    for its first ``prompt_len`` tokens. ``lora_slot`` is its adapter's slot, or -1.
    ``images`` are its prompt's images until their tokens and multimodal positions are all computed; the rotary
    position of a later token is its index plus ``position_offset``. The last ``drafts`` of ``token_ids`` are
    draft tokens that the step in flight checks (``ModelRunner.forward``); each of their rows samples. A draft
    model's pool holds the KV of the first ``draft_computed`` tokens; an EAGLE-3 head keeps the model's features
    of the positions from ``draft_hidden[0]`` on (``gpu_proc.eagle3``).
    """

    token_ids: list[int]
    num_computed: int
    pages: list[int] = field(default_factory=list)
    prompt_len: int = 0
    prompt_logprobs: int | None = None
    lora_slot: int = -1
    images: SlotImages | None = None
    position_offset: int = 0
    drafts: int = 0
    draft_computed: int = 0
    draft_hidden: tuple[int, torch.Tensor] | None = None


@dataclass
class StepRows:
    """The per-row lists of one step, gathered on the host before they go to the device in one copy.

    ``device_rows`` are rows whose token the host does not know yet (sampled by the step before, still on its
    way): they read it from ``last_tokens[device_slots]``. ``prompt_targets`` holds, per slot owing prompt
    logprobs, the prompt tokens whose logprobs this step computes (their rows are ``prompt_rows``).
    ``mrope`` holds (first row, [3, rows] positions) of the prompt rows of slots with multimodal rotary positions;
    ``image_rows`` are the rows of image tokens, whose embeddings are ``image_pieces`` (``splice_embeddings``).
    """

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    qo_indptr: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    device_rows: list[int] = field(default_factory=list)
    device_slots: list[int] = field(default_factory=list)
    prompt_targets: list[tuple[int, list[int]]] = field(default_factory=list)
    mrope: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    image_rows: list[int] = field(default_factory=list)
    image_pieces: list[tuple[SlotImages, int, int, int]] = field(default_factory=list)


class SlotState:
    """Each slot's ``Sequence``, its block table on the device, and its newest token on the device
    (``last_tokens``, which every sampling writes) for ``max_slots`` slots of ``max_pages`` pages. ``model``
    encodes images and, where it has them, gives their multimodal rotary positions (``rope_index``)."""

    def __init__(self, max_slots: int, max_pages: int, page_size: int, device: torch.device, model: nn.Module) -> None:
        self.page_size, self.device, self.model = page_size, device, model
        self.seqs: dict[int, Sequence] = {}
        self.block_tables = torch.zeros(max_slots, max_pages, dtype=torch.int32, device=device)
        self.last_tokens = torch.zeros(max_slots, dtype=torch.int64, device=device)

    def apply(self, plan: BatchPlan) -> None:
        """Free, fill and grow the slots as the plan says."""
        for slot in plan.freed:
            self.seqs.pop(slot, None)
        for new in plan.new:
            self.seqs[new.slot] = Sequence(
                list(new.token_ids),
                new.num_cached,
                prompt_len=len(new.token_ids),
                prompt_logprobs=new.params.prompt_logprobs if new.num_outputs == 0 else None,
                lora_slot=new.lora_slot,
                images=self._images(new) if new.images else None,
            )
        if plan.beams:
            self._fork(plan.beams)
        if plan.pages:
            rows, cols, values = [], [], []
            for slot, pages in plan.pages:
                seq = self.seqs[slot]
                rows += [slot] * len(pages)
                cols += range(len(seq.pages), len(seq.pages) + len(pages))
                values += pages
                seq.pages.extend(pages)
            index = upload([rows, cols, values], torch.int64, self.device)
            self.block_tables[index[0], index[1]] = index[2].int()

    def _fork(self, beams: list[BeamFork]) -> None:
        """Give each beam slot its source's computed tokens and leading pages, then its chosen token. The sources
        are read as they were before any of these changes."""
        sources = {beam.source: self.seqs[beam.source] for beam in beams}
        for beam in beams:
            src = sources[beam.source]
            self.seqs[beam.slot] = dataclasses.replace(
                src,
                token_ids=src.token_ids[: src.num_computed] + [beam.token],
                pages=src.pages[: beam.num_shared_pages],
                prompt_logprobs=None,
            )
        moved = [(beam.slot, beam.source, beam.num_shared_pages) for beam in beams if beam.slot != beam.source]
        for slot, source, k in moved:
            self.block_tables[slot, :k] = self.block_tables[source, :k]

    def _images(self, new: NewSequence) -> SlotImages:
        images = SlotImages(new.images)
        rope_index = getattr(self.model, "rope_index", None)
        if rope_index is not None:
            images.rope, images.rope_delta = rope_index(len(new.token_ids), new.images)
        return images

    def _rows(self, plan: BatchPlan) -> StepRows:
        """The rows of every slot the plan runs, in plan order; advances each slot's ``num_computed``."""
        rows, ps = StepRows(), self.page_size
        for slot, n, sample in zip(plan.slots, plan.num_tokens, plan.sample):
            seq = self.seqs[slot]
            start, end = seq.num_computed, seq.num_computed + n
            if start < len(seq.token_ids):
                rows.ids.extend(seq.token_ids[start:end])
            else:
                assert start == len(seq.token_ids) and n == 1, "only a slot's newest token may be unknown here"
                rows.device_rows.append(len(rows.ids))
                rows.device_slots.append(slot)
                rows.ids.append(0)
            if seq.images is None:
                rows.positions.extend(range(start + seq.position_offset, end + seq.position_offset))
            else:
                self._image_rows(rows, seq, start, end)
            rows.slot_mapping.extend(seq.pages[p // ps] * ps + p % ps for p in range(start, end))
            if seq.prompt_logprobs is not None and start < seq.prompt_len - 1:
                last = min(end, seq.prompt_len - 1)
                rows.prompt_rows.extend(range(rows.qo_indptr[-1], rows.qo_indptr[-1] + last - start))
                rows.prompt_targets.append((slot, seq.token_ids[start + 1 : last + 1]))
            rows.qo_indptr.append(rows.qo_indptr[-1] + n)
            rows.seq_lens.append(end)
            if sample:
                rows.sample_rows.extend(range(rows.qo_indptr[-1] - 1 - seq.drafts, rows.qo_indptr[-1]))
            seq.num_computed = end
        return rows

    @staticmethod
    def _image_rows(rows: StepRows, seq: Sequence, start: int, end: int) -> None:
        """The positions of a slot with images, whose rows ``start:end`` come last in ``rows.ids``, and its image
        rows. Once they are all computed, the slot runs as one without images."""
        images, row = seq.images, len(rows.ids) - (end - start)
        known = start if images.rope is None else min(end, images.rope.shape[1])
        if start < known:
            rows.mrope.append((row, images.rope[:, start:known]))
            rows.positions.extend(images.rope[0, start:known].tolist())
        rows.positions.extend(range(max(start, known) + images.rope_delta, end + images.rope_delta))
        for k, a, b in images.pieces(start, end):
            first = row + images.images[k].offset + a - start
            rows.image_rows.extend(range(first, first + b - a))
            rows.image_pieces.append((images, k, a, b))
        if end >= images.end:
            seq.images, seq.position_offset = None, images.rope_delta

    def batch(
        self, plan: BatchPlan, sample_slots: list[int], num_kv_heads: int, attention_span: int, num_loras: int
    ) -> tuple[ForwardBatch, torch.Tensor, list[tuple[int, list[int]]]]:
        """The step's batch, ``sample_slots`` (the slots that sample) on the device, and ``StepRows.prompt_targets``.

        Every per-token input goes to the device in one copy; block tables are already there. ``logit_rows``
        are the sampling rows, then the rows of prompt positions whose next token's logprob is owed.
        """
        rows = self._rows(plan)
        groups = self._lora_groups(plan.slots, rows.qo_indptr, num_loras)
        lora_rows = [row for group in groups for row in group]
        t = upload_named(
            self.device,
            ids=rows.ids,
            positions=rows.positions,
            slot_mapping=rows.slot_mapping,
            qo_indptr=rows.qo_indptr,
            seq_lens=rows.seq_lens,
            logit_rows=rows.sample_rows + rows.prompt_rows,
            slots=plan.slots,
            sample_slots=sample_slots,
            device_rows=rows.device_rows,
            device_slots=rows.device_slots,
            lora_rows=lora_rows,
            lora_indptr=[0, *itertools.accumulate(map(len, groups))] if lora_rows else [],
        )
        input_ids = t["ids"]
        if rows.device_rows:
            input_ids = input_ids.index_copy(0, t["device_rows"], self.last_tokens[t["device_slots"]])
        max_q_len = max(plan.num_tokens)
        images = bool(rows.image_rows or rows.mrope)
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=t["positions"],
            slot_mapping=t["slot_mapping"],
            qo_indptr=t["qo_indptr"].int(),
            seq_lens=t["seq_lens"].int(),
            block_table=self.block_tables[t["slots"]],
            logit_rows=t["logit_rows"],
            max_q_len=max_q_len,
            decode=max_q_len == 1 and not rows.prompt_rows and not images,
            num_splits=choose_num_splits(len(rows.seq_lens), num_kv_heads, attention_span),
            lora_rows=t["lora_rows"].int() if lora_rows else None,
            lora_indptr=t["lora_indptr"].int() if lora_rows else None,
            lora_max_rows=max(map(len, groups), default=0),
        )
        if images:
            self._add_images(batch, rows)
        return batch, t["sample_slots"], rows.prompt_targets

    def _add_images(self, batch: ForwardBatch, rows: StepRows) -> None:
        """Give ``batch`` its multimodal rotary positions and its image rows' embeddings."""
        if rows.mrope:
            mrope = torch.tensor(rows.positions).expand(3, -1).clone()
            for row, positions in rows.mrope:
                mrope[:, row : row + positions.shape[1]] = positions
            batch.mrope_positions = mrope.to(self.device, non_blocking=True)
        if rows.image_rows:
            batch.image_rows = upload(rows.image_rows, torch.int64, self.device)
            batch.image_embeds = splice_embeddings(self.model, rows.image_pieces, self.device)

    def _lora_groups(self, slots: list[int], qo_indptr: list[int], num_loras: int) -> list[list[int]]:
        """The rows of each LoRA slot's sequences, by slot; none when no sequence has an adapter."""
        groups: list[list[int]] = [[] for _ in range(num_loras)]
        for i, slot in enumerate(slots):
            lora_slot = self.seqs[slot].lora_slot
            if lora_slot >= 0:
                groups[lora_slot].extend(range(qo_indptr[i], qo_indptr[i + 1]))
        return groups if any(groups) else []
