"""ModelRunner: applies a BatchPlan to its slot state, runs the model, samples.

A step is queued in three calls, so that the host prepares step N+1 while the device
runs step N: ``forward`` (the plan and the forward pass), ``sample`` (once the tokens
of the step before are on the host), and ``finish`` (waits for the step, reads it back).
A slot's newest token may still be on the device when the next step needs it as input:
``forward`` takes it from ``last_tokens``, which every sampling writes.

Under tensor parallelism every rank runs every plan; only rank 0 samples, and the
other ranks receive its tokens by broadcast.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch
from tristream.config import EngineConfig
from tristream.gpu_proc.cuda_graph import CudaGraphRunner
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.grammar import GrammarMatchers, SlotGrammar, accept_each
from tristream.gpu_proc.kv_cache import KVCache, allocate_kv_cache, kv_cache_pages
from tristream.gpu_proc.lora import LoraWeights
from tristream.gpu_proc.model import DecoderLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.gpu_proc.sampler import Sampled, Sampler, SamplingState
from tristream.gpu_proc.step_clock import StepClock
from tristream.gpu_proc.upload import download, upload
from tristream.gpu_proc.weights import dummy_weights, load_safetensors, load_weights
from tristream.kernels.attention import choose_num_splits
from tristream.lora import DEFAULT_LORA_RANK
from tristream.model_config import ModelConfig
from tristream.protocol import BatchPlan, NewSequence, StepResult
from tristream.sampling_params import SamplingParams
from tristream.sharding import shard_model

logger = logging.getLogger("tristream")


@dataclass
class Sequence:
    """What the gpu_proc knows of one slot: all its tokens, how many have KV, its pages.

    ``prompt_logprobs`` (top k) is set while the slot still owes prompt logprobs
    for its first ``prompt_len`` tokens. ``lora_slot`` is its adapter's slot, or -1.
    """

    token_ids: list[int]
    num_computed: int
    pages: list[int] = field(default_factory=list)
    prompt_len: int = 0
    prompt_logprobs: int | None = None
    lora_slot: int = -1


@dataclass
class QueuedStep:
    """A step on its way through the device: what ``sample`` and ``finish`` need of it."""

    plan: BatchPlan
    clock: StepClock
    before: StepClock | None
    seqs: list[Sequence] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    slots_on_device: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    prompt_targets: list[tuple[int, list[int]]] = field(default_factory=list)
    grammars: list[SlotGrammar | None] = field(default_factory=list)
    sampled: Sampled | None = None
    prompt_logprobs: tuple | None = None


def resolve_device(config: EngineConfig, rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank ``rank``: CUDA device ``rank``, or the CPU."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
    if config.tensor_parallel_size > torch.cuda.device_count():
        raise RuntimeError(
            f"tensor_parallel_size={config.tensor_parallel_size} needs as many CUDA devices; "
            f"torch sees {torch.cuda.device_count()}"
        )
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    """Owns the weights, the KV pools and the per-slot state of one gpu_proc: tensor-parallel rank
    ``rank``, whose group meets through the file ``rendezvous``.

    ``model_config`` holds the shapes of this rank's shard. Only rank 0 has a sampler and grammars.
    It holds ``config.lora_slots`` LoRA slots, the first ones loaded with ``config.lora_adapters``.
    """

    def __init__(self, config: EngineConfig, rank: int = 0, rendezvous: str | None = None) -> None:
        self.config = config
        self.device = resolve_device(config, rank)
        self.dtype = resolve_dtype(config, self.device)
        self.whole_config = whole = ModelConfig.load(config.model)
        shard = shard_model(whole, config.tensor_parallel_size, rank)
        decode_bytes = config.max_num_seqs * whole.hidden_size * self.dtype.itemsize
        self.tp = TensorParallel(shard, self.device, rendezvous, decode_bytes, self.dtype)
        self.model_config = mc = shard.local_config(whole)
        start = time.perf_counter()
        with torch.device("meta"):
            model = DecoderLM(mc, shard, self.tp)
        model = model.to_empty(device=self.device).to(self.dtype)
        if mc.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if config.load_format == "dummy":
            load_weights(model, dummy_weights(whole, self.dtype, self.device, config.seed), "dummy weights")
        else:
            load_safetensors(model, config.model)
        model.build_rope(config.max_model_len, self.device)
        self.lora: LoraWeights | None = None
        if config.lora_slots:
            max_rank = config.max_lora_rank or DEFAULT_LORA_RANK
            self.lora = LoraWeights(mc, shard, config.lora_slots, max_rank, self.dtype, self.device)
            for slot, path in enumerate((config.lora_adapters or {}).values()):
                self.lora.load(slot, path, whole)
            model.use_lora(self.lora)
        self.model = model.eval()
        logger.info(
            "loaded %s (%s, %s) on %s in %.1f s%s",
            mc.architecture,
            config.load_format,
            self.dtype,
            self.device,
            time.perf_counter() - start,
            f", tensor-parallel rank {rank} of {shard.size}" if shard.size > 1 else "",
        )
        self.page_size = config.page_size
        self.seqs: dict[int, Sequence] = {}
        max_pages = -(-config.max_model_len // config.page_size)
        self.block_tables = torch.zeros(config.max_num_seqs, max_pages, dtype=torch.int32, device=self.device)
        self.last_tokens = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        self.last_clock: StepClock | None = None
        self.sampler: Sampler | None = None
        self.grammar: GrammarMatchers | None = None
        if rank == 0:
            self.sampler = Sampler(SamplingState(config.max_num_seqs, mc.vocab_size, mc.eos_token_ids, self.device))
            self.grammar = GrammarMatchers(
                config.tokenizer or config.model, mc.vocab_size, mc.eos_token_ids, self.device
            )
        self.graphs: CudaGraphRunner | None = None
        explicit = config.kv_cache_tokens is not None or config.kv_cache_bytes is not None
        budget = self._cuda_kv_budget() if self.device.type == "cuda" and not explicit else None
        num_pages = self.tp.min(kv_cache_pages(config, mc, self.dtype, budget))
        self.kv = allocate_kv_cache(config, mc, self.dtype, self.device, num_pages)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = CudaGraphRunner(
                self.model,
                self.kv,
                config.max_num_seqs,
                self.block_tables.shape[1],
                config.max_model_len,
                config.lora_slots,
            )

    @torch.inference_mode()
    def _cuda_kv_budget(self) -> int:
        """Bytes left for KV under ``gpu_memory_utilization`` after the weights and a measured peak.

        The peak comes from a prefill of ``max_num_batched_tokens`` tokens and a
        top-k/top-p sampling of ``max_num_seqs`` rows, run once on a temporary pool.
        """
        config, mc = self.config, self.model_config
        tokens = min(config.max_num_batched_tokens, config.max_model_len)
        pages = -(-tokens // config.page_size) + 1
        scratch = KVCache(
            torch.zeros(
                (mc.num_layers, 2, pages, config.page_size, mc.num_kv_heads, mc.head_dim),
                dtype=self.dtype,
                device=self.device,
            )
        )
        scratch_bytes = scratch.pool.numel() * scratch.pool.element_size()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        kv, self.kv = getattr(self, "kv", None), scratch
        probe = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=0)
        plan = BatchPlan(
            0,
            new=[NewSequence(0, [0] * tokens, 0, 0, probe)],
            pages=[(0, list(range(1, pages)))],
            slots=[0],
            num_tokens=[tokens],
            sample=[True],
        )
        self.step(plan)
        if self.sampler is not None:
            for slot in range(config.max_num_seqs):
                self.sampler.state.set(slot, probe, [0], 0)
            logits = torch.randn(config.max_num_seqs, mc.vocab_size, device=self.device)
            self.sampler(
                logits, torch.arange(config.max_num_seqs, device=self.device), list(range(config.max_num_seqs))
            )
            del logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_bytes
        self.kv, self.seqs, self.last_clock = kv, {}, None
        self.block_tables.zero_()
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        budget = int(total * config.gpu_memory_utilization) - peak - outside_torch
        logger.info(
            "GPU memory: %.2f GiB total, peak %.2f GiB with weights and activations, %.2f GiB used outside torch, "
            "%.2f GiB left for KV at gpu_memory_utilization=%.2f",
            total / 2**30,
            peak / 2**30,
            outside_torch / 2**30,
            max(budget, 0) / 2**30,
            config.gpu_memory_utilization,
        )
        return max(budget, 0)

    @torch.inference_mode()
    def load_lora(self, slot: int, path: str) -> None:
        """Load the adapter in directory ``path`` into ``slot``, after the steps already queued."""
        if self.lora is None:
            raise ValueError("this engine runs without LoRA slots (max_loras=0)")
        self.lora.load(slot, path, self.whole_config)

    @property
    def info(self) -> dict:
        return {"num_pages": self.kv.num_pages, "device": str(self.device), "dtype": str(self.dtype)}

    def _apply(self, plan: BatchPlan) -> None:
        for slot in plan.freed:
            self.seqs.pop(slot, None)
        for new in plan.new:
            self.seqs[new.slot] = Sequence(
                list(new.token_ids),
                new.num_cached,
                prompt_len=len(new.token_ids),
                prompt_logprobs=new.params.prompt_logprobs if new.num_outputs == 0 else None,
                lora_slot=new.lora_slot,
            )
        if self.sampler is not None:
            for slot in plan.freed:
                self.grammar.remove(slot)
            for new in plan.new:
                if new.grammar is not None:
                    self.grammar.add(new.slot, new.grammar, new.token_ids[len(new.token_ids) - new.num_outputs :])
                else:
                    self.grammar.remove(new.slot)
                self.sampler.state.set(new.slot, new.params, new.token_ids, new.num_outputs, new.bad_words_ids)
        if plan.pages:
            rows: list[int] = []
            cols: list[int] = []
            values: list[int] = []
            for slot, pages in plan.pages:
                seq = self.seqs[slot]
                rows += [slot] * len(pages)
                cols += range(len(seq.pages), len(seq.pages) + len(pages))
                values += pages
                seq.pages.extend(pages)
            index = upload([rows, cols, values], torch.int64, self.device)
            self.block_tables[index[0], index[1]] = index[2].int()
        if plan.copies:
            self.kv.copy_pages(plan.copies)

    def _build_batch(
        self, plan: BatchPlan, sample_slots: list[int]
    ) -> tuple[ForwardBatch, torch.Tensor, list[tuple[int, list[int]]]]:
        """The batch, ``sample_slots`` (the slots that sample) on the device, and per slot owing prompt logprobs the prompt
        tokens whose logprobs this step computes. All per-token inputs go to the device in
        one copy; block tables are already there. A row whose token the host does not know
        yet (sampled by the step before, still on its way) reads it from ``last_tokens``.

        ``logit_rows`` are the sampling rows, then the rows of prompt positions whose
        next token's logprob is owed."""
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        qo_indptr = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[tuple[int, list[int]]] = []
        device_rows: list[int] = []
        device_slots: list[int] = []
        ps = self.page_size
        for slot, n, sample in zip(plan.slots, plan.num_tokens, plan.sample):
            seq = self.seqs[slot]
            start, end = seq.num_computed, seq.num_computed + n
            if start < len(seq.token_ids):
                ids.extend(seq.token_ids[start:end])
            else:
                assert start == len(seq.token_ids) and n == 1, "only a slot's newest token may be unknown here"
                device_rows.append(len(ids))
                device_slots.append(slot)
                ids.append(0)
            positions.extend(range(start, end))
            slot_mapping.extend(seq.pages[p // ps] * ps + p % ps for p in range(start, end))
            if seq.prompt_logprobs is not None and start < seq.prompt_len - 1:
                last = min(end, seq.prompt_len - 1)
                prompt_rows.extend(range(qo_indptr[-1], qo_indptr[-1] + last - start))
                prompt_targets.append((slot, seq.token_ids[start + 1 : last + 1]))
            qo_indptr.append(qo_indptr[-1] + n)
            seq_lens.append(end)
            if sample:
                sample_rows.append(qo_indptr[-1] - 1)
            seq.num_computed = end
        lora_groups = self._lora_groups(plan.slots, qo_indptr)
        lora_rows = [row for group in lora_groups for row in group]
        lora_indptr = [0] + list(itertools.accumulate(len(group) for group in lora_groups)) if lora_rows else []
        t, b, s, r, d = len(ids), len(seq_lens), len(sample_rows), len(sample_rows) + len(prompt_rows), len(device_rows)
        parts = upload(
            ids
            + positions
            + slot_mapping
            + qo_indptr
            + seq_lens
            + sample_rows
            + prompt_rows
            + plan.slots
            + sample_slots
            + device_rows
            + device_slots
            + lora_rows
            + lora_indptr,
            torch.int64,
            self.device,
        ).split([t, t, t, b + 1, b, r, b, s, d, d, len(lora_rows), len(lora_indptr)])
        input_ids = parts[0]
        if d:
            input_ids = input_ids.index_copy(0, parts[8], self.last_tokens[parts[9]])
        max_q_len = max(plan.num_tokens)
        return (
            ForwardBatch(
                input_ids=input_ids,
                positions=parts[1],
                slot_mapping=parts[2],
                qo_indptr=parts[3].int(),
                seq_lens=parts[4].int(),
                block_table=self.block_tables[parts[6]],
                logit_rows=parts[5],
                max_q_len=max_q_len,
                decode=max_q_len == 1 and not prompt_rows,
                num_splits=choose_num_splits(b, self.model_config.num_kv_heads, self.config.max_model_len),
                lora_rows=parts[10].int() if lora_rows else None,
                lora_indptr=parts[11].int() if lora_rows else None,
                lora_max_rows=max(map(len, lora_groups), default=0),
            ),
            parts[7],
            prompt_targets,
        )

    def _lora_groups(self, slots: list[int], qo_indptr: list[int]) -> list[list[int]]:
        """The rows of each LoRA slot's sequences, by slot; none when no sequence has an adapter."""
        if self.lora is None:
            return []
        groups: list[list[int]] = [[] for _ in range(self.config.lora_slots)]
        for i, slot in enumerate(slots):
            lora_slot = self.seqs[slot].lora_slot
            if lora_slot >= 0:
                groups[lora_slot].extend(range(qo_indptr[i], qo_indptr[i + 1]))
        return groups if any(groups) else []

    @torch.inference_mode()
    def step(self, plan: BatchPlan) -> StepResult:
        """Run one planned step and return the sampled tokens."""
        queued = self.forward(plan)
        self.sample(queued)
        return self.finish(queued)

    @torch.inference_mode()
    def forward(self, plan: BatchPlan) -> QueuedStep:
        """Apply the plan and queue its forward pass."""
        clock = StepClock(self.device)
        clock.mark()
        queued = QueuedStep(plan, clock, None if plan.after_idle else self.last_clock)
        self.last_clock = clock
        self._apply(plan)
        if plan.slots:
            queued.slots = [slot for slot, sample in zip(plan.slots, plan.sample) if sample]
            queued.seqs = [self.seqs[slot] for slot in queued.slots]
            batch, queued.slots_on_device, queued.prompt_targets = self._build_batch(plan, queued.slots)
            if self.graphs is not None and batch.decode:
                queued.logits = self.graphs.run(batch)
            else:
                queued.logits = self.model(batch, self.kv)
        clock.mark()
        return queued

    @torch.inference_mode()
    def sample(self, queued: QueuedStep) -> None:
        """Queue the sampling of a step whose forward pass is queued. Every step before it must be
        finished, since bad words and grammars look at the tokens before."""
        queued.clock.mark()
        if queued.logits is not None:
            k = len(queued.slots)
            if self.sampler is None:
                if k:
                    tokens = self.tp.broadcast(torch.empty(k, dtype=torch.int64, device=self.device))
                    queued.sampled = Sampled(tokens, download(tokens), None, [])
            else:
                queued.prompt_logprobs = self._prompt_logprobs(queued.logits[k:], queued.prompt_targets)
                if k:
                    queued.grammars = self.grammar.of(queued.slots)
                    bitmask = self.grammar.bitmask_of(queued.grammars)
                    queued.sampled = self.sampler.launch(
                        queued.logits[:k], queued.slots_on_device, queued.slots, bitmask
                    )
                    self.tp.broadcast(queued.sampled.tokens)
            if k:
                self.last_tokens.index_copy_(0, queued.slots_on_device, queued.sampled.tokens)
            queued.logits = None
        queued.clock.mark()

    def finish(self, queued: QueuedStep) -> StepResult:
        """Wait for a queued step and return its results; its tokens join their sequences on the host."""
        queued.clock.wait()
        tokens, logprobs = queued.sampled.finish() if queued.sampled is not None else ([], None)
        accept_each(queued.grammars, tokens)
        for seq, token in zip(queued.seqs, tokens):
            seq.token_ids.append(token)
        return StepResult(
            queued.plan.step_id,
            queued.slots,
            tokens,
            logprobs,
            self._prompt_logprob_lists(queued),
            gpu_busy_s=queued.clock.busy_s(),
            gpu_idle_s=queued.clock.idle_s(queued.before),
        )

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[tuple[int, list[int]]]) -> tuple | None:
        """Queued on the device: each target's logprob and the top k of its row, from the raw logits."""
        if not targets:
            return None
        lp = logits.float().log_softmax(dim=-1)
        ids = upload([t for _, tokens in targets for t in tokens], torch.int64, lp.device)
        ns = [self.seqs[slot].prompt_logprobs for slot, _ in targets]
        k = max(ns)
        top_values, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], ids[:, None][:, :0])
        return ns, download(lp.gather(1, ids[:, None])[:, 0]), download(top_ids), download(top_values)

    @staticmethod
    def _prompt_logprob_lists(queued: QueuedStep) -> list[tuple[int, list[list[tuple[int, float]]]]]:
        """Per slot, [(prompt token, logprob), then the top k] for each target, once on the host."""
        if queued.prompt_logprobs is None:
            return []
        ns, picked, top_ids, top_values = queued.prompt_logprobs
        picked, top_ids, top_values = picked.tolist(), top_ids.tolist(), top_values.tolist()
        out, row = [], 0
        for (slot, tokens), n in zip(queued.prompt_targets, ns):
            out.append(
                (
                    slot,
                    [
                        [(token, picked[row + i])] + list(zip(top_ids[row + i][:n], top_values[row + i][:n]))
                        for i, token in enumerate(tokens)
                    ],
                )
            )
            row += len(tokens)
        return out
