"""ModelRunner: applies a BatchPlan to its slot state, runs the model, samples.

A step is queued in three calls, so that the host prepares step N+1 while the device
runs step N: ``forward`` (the plan and the forward pass), ``sample`` (once the tokens
of the step before are on the host), and ``finish`` (waits for the step, reads it back).
A slot's newest token may still be on the device when the next step needs it as input:
``forward`` takes it from ``last_tokens``, which every sampling writes.

Under tensor parallelism every rank runs every plan; only rank 0 samples, and the
other ranks receive its tokens by broadcast.

A step with rows of embedding requests runs eagerly (never as a CUDA graph) and keeps every
row's final-norm hidden state for the ``Pooler``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from tristream.config import EngineConfig
from tristream.gpu_proc.cuda_graph import CudaGraphRunner
from tristream.gpu_proc.draft_model import DraftModel
from tristream.gpu_proc.eagle3 import Eagle3Draft
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.grammar import GrammarMatchers, SlotGrammar, accept_each
from tristream.gpu_proc.kv_cache import allocate_kv_cache, kv_cache_pages
from tristream.gpu_proc.lora import LoraWeights
from tristream.gpu_proc.memory import cuda_kv_budget
from tristream.gpu_proc.parallel import TensorParallel
from tristream.gpu_proc.pooler import Pooler
from tristream.gpu_proc.sampler import Sampled, Sampler, SamplingState
from tristream.gpu_proc.slot_state import Sequence, SlotState
from tristream.gpu_proc.speculative import NgramProposer, accepted
from tristream.gpu_proc.step_clock import StepClock
from tristream.gpu_proc.upload import download, upload
from tristream.gpu_proc.weights import build_model
from tristream.lora import DEFAULT_LORA_RANK
from tristream.model_config import ModelConfig
from tristream.protocol import BatchPlan, StepResult
from tristream.sharding import Shard, shard_model

logger = logging.getLogger("tristream")


@dataclass
class QueuedStep:
    """A step on its way through the device: what ``sample`` and ``finish`` need of it. ``slots`` (and their
    ``seqs``) sample; ``rows`` is the slot of each sampling row (a slot with drafts has one per draft too), and,
    where some slot has drafts, ``offsets`` each row's place among its slot's rows (on the device) and ``drafts``
    the draft each row follows (None for a slot's first row)."""

    plan: BatchPlan
    clock: StepClock
    before: StepClock | None
    seqs: list[Sequence] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    offsets: torch.Tensor | None = None
    drafts: list[int | None] | None = None
    slots_on_device: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    prompt_targets: list[tuple[int, list[int]]] = field(default_factory=list)
    grammars: list[SlotGrammar | None] = field(default_factory=list)
    sampled: Sampled | None = None
    prompt_logprobs: tuple | None = None
    pooled: tuple[list[int], torch.Tensor] | None = None

    def feeds(self, plan: BatchPlan) -> bool:
        """Whether ``plan`` needs this step's tokens on the host: it gives drafts to a slot that this step samples,
        or runs a slot whose drafts this step checks. The scheduler plans such a slot only after rank 0 finished
        this step; another rank, a step behind, must finish it first."""
        drafts = {slot: seq.drafts for slot, seq in zip(self.slots, self.seqs)}
        return any(slot in drafts and (n > 1 or drafts[slot]) for slot, n in zip(plan.slots, plan.num_tokens))


def resolve_device(config: EngineConfig, index: int = 0) -> torch.device:
    """CUDA device ``index`` of this host, or the CPU."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"this rank runs on CUDA device {index}, but torch sees {torch.cuda.device_count()}: an engine needs "
            "tensor_parallel_size × data_parallel_size devices (divided over its hosts)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    """Owns the weights, the KV pools and the per-slot state of one gpu_proc: tensor-parallel rank
    ``rank`` on CUDA device ``device_index`` (or the CPU), whose group meets at the store ``rendezvous``.

    ``model_config`` holds the shapes of this rank's shard. Only rank 0 has a sampler and grammars.
    It holds ``config.lora_slots`` LoRA slots, the first ones loaded with ``config.lora_adapters``.
    """

    def __init__(
        self, config: EngineConfig, rank: int = 0, rendezvous: str | None = None, device_index: int = 0
    ) -> None:
        self.config = config
        self.device = resolve_device(config, device_index)
        if self.device.type == "cpu":
            # The ranks of every replica share the host's cores.
            share = config.tensor_parallel_size // config.nnodes * config.data_parallel_size
            torch.set_num_threads(max(1, torch.get_num_threads() // share))
        self.dtype = resolve_dtype(config, self.device)
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else torch.float8_e4m3fn
        self.whole_config = whole = ModelConfig.load(config.model)
        shard = shard_model(whole, config.tensor_parallel_size, rank)
        decode_bytes = config.max_num_seqs * whole.hidden_size * self.dtype.itemsize
        self.tp = TensorParallel(shard, self.device, rendezvous, decode_bytes, self.dtype)
        self.model_config = mc = shard.local_config(whole)
        self._load(shard)
        self.last_clock: StepClock | None = None
        self.sampler: Sampler | None = None
        self.grammar: GrammarMatchers | None = None
        if rank == 0:
            self.sampler = Sampler(SamplingState(config.max_num_seqs, mc.vocab_size, mc.eos_token_ids, self.device))
            self.grammar = GrammarMatchers(
                config.tokenizer or config.model, mc.vocab_size, mc.eos_token_ids, self.device
            )
        self.graphs: CudaGraphRunner | None = None
        self.pooler = Pooler()
        self._drafts()
        # Decode splits each query's keys over this many positions at most (a sliding window's, if every layer has one).
        self.attention_span = mc.attention_span(config.max_model_len)
        explicit = config.kv_cache_tokens is not None or config.kv_cache_bytes is not None
        budget = cuda_kv_budget(self) if self.device.type == "cuda" and not explicit else None
        draft_bytes = self.draft.bytes_per_token(self.kv_dtype) if self.draft else 0
        num_pages = self.tp.min(kv_cache_pages(config, mc, self.kv_dtype, budget, draft_bytes))
        self.kv = allocate_kv_cache(config, mc, self.kv_dtype, self.device, num_pages)
        max_pages = -(-config.max_model_len // config.page_size)
        self.slots = SlotState(config.max_num_seqs, max_pages, config.page_size, self.device, self.model)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = CudaGraphRunner(
                self.model, self.kv, config.max_num_seqs, max_pages, self.attention_span, config.lora_slots
            )
        if self.draft:
            self.draft.allocate(num_pages, self.kv_dtype, self.slots.block_tables)

    def _load(self, shard: Shard) -> None:
        """The weights of this rank's ``shard``, and the LoRA slots with the start-up adapters in them."""
        config, whole, start = self.config, self.whole_config, time.perf_counter()
        self.model = build_model(config, whole, shard, self.tp, self.dtype, self.device)
        self.lora: LoraWeights | None = None
        if config.lora_slots:
            self.lora = LoraWeights(self.model, config.lora_slots, config.max_lora_rank or DEFAULT_LORA_RANK)
            for slot, path in enumerate((config.lora_adapters or {}).values()):
                self.lora.load(slot, path, whole)
            self.model.use_lora(self.lora)
        logger.info(
            "loaded %s (%s, %s) on %s in %.1f s%s",
            self.model_config.architecture,
            config.load_format,
            self.dtype,
            self.device,
            time.perf_counter() - start,
            f", tensor-parallel rank {shard.rank} of {shard.size}" if shard.size > 1 else "",
        )

    def _drafts(self) -> None:
        """The speculative draft model or EAGLE-3 head, if any, and what proposes drafts (it, or n-gram lookup)."""
        config, spec = self.config, self.config.speculative
        self.draft: DraftModel | Eagle3Draft | None = None
        if spec and spec.method == "draft":
            self.draft = DraftModel(config, self.dtype, self.device)
        elif spec and spec.method == "eagle3":
            self.draft = Eagle3Draft(config, self.model, self.model_config, self.dtype, self.device)
        self.proposer = self.draft or (NgramProposer(spec) if spec else None)

    @torch.inference_mode()
    def load_lora(self, slot: int, path: str) -> None:
        """Load the adapter in directory ``path`` into ``slot``, after the steps already queued."""
        if self.lora is None:
            raise ValueError("this engine runs without LoRA slots (max_loras=0)")
        self.lora.load(slot, path, self.whole_config)

    def _apply(self, plan: BatchPlan) -> None:
        self.slots.apply(plan)
        self.pooler.apply(plan)
        if self.sampler is not None:
            for slot in plan.freed:
                self.grammar.remove(slot)
            for new in plan.new:
                if new.grammar is not None:
                    self.grammar.add(new.slot, new.grammar, new.token_ids[len(new.token_ids) - new.num_outputs :])
                else:
                    self.grammar.remove(new.slot)
                self.sampler.state.set(new.slot, new.params, new.token_ids, new.num_outputs, new.bad_words_ids)
            self.sampler.state.copy_slots([(b.source, b.slot) for b in plan.beams if b.source != b.slot])
            self.sampler.state.count_chosen([(b.slot, b.token) for b in plan.beams])
        if plan.copies:
            self.kv.copy_pages(plan.copies)

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
            plan = self._propose(plan)
            queued.slots = [slot for slot, sample in zip(plan.slots, plan.sample) if sample]
            queued.seqs = [self.slots.seqs[slot] for slot in queued.slots]
            places = [range(1 + seq.drafts) for seq in queued.seqs]
            queued.rows = [slot for slot, place in zip(queued.slots, places) for _ in place]
            if len(queued.rows) > len(queued.slots):
                queued.offsets = upload([i for place in places for i in place], torch.int64, self.device)
                queued.drafts = [
                    seq.token_ids[len(seq.token_ids) - seq.drafts - 1 + i] if i else None
                    for seq, place in zip(queued.seqs, places)
                    for i in place
                ]
            batch, queued.slots_on_device, queued.prompt_targets = self.slots.batch(
                plan, queued.rows, self.model_config.num_kv_heads, self.attention_span, self.config.lora_slots
            )
            spans = self.pooler.spans(plan)
            if spans:
                queued.logits = self._pool(batch, spans, queued)
            elif self.graphs is not None and batch.decode:
                queued.logits = self.graphs.run(batch)
            else:
                queued.logits = self.model(batch, self.kv)
                if isinstance(self.draft, Eagle3Draft):
                    self.draft.record(
                        plan.slots, plan.num_tokens, self.slots.seqs, batch, self.sampler.state.may_speculate
                    )
        clock.mark()
        return queued

    def _propose(self, plan: BatchPlan) -> BatchPlan:
        """Give each slot that the plan leaves room for drafts (more tokens than its newest) its draft tokens, at
        the end of its token ids; the plan with such a slot's rows cut to its newest token and its drafts."""
        rooms = []
        for i, (slot, n) in enumerate(zip(plan.slots, plan.num_tokens)):
            seq = self.slots.seqs[slot]
            if n > 1 and seq.num_computed == len(seq.token_ids) - 1:
                rooms.append((i, slot, n - 1))
        if not rooms:
            return plan
        num_tokens = list(plan.num_tokens)
        items = [(slot, self.slots.seqs[slot], room) for _, slot, room in rooms]
        for (i, slot, _), drafts in zip(rooms, self.proposer.propose(items)):
            seq = self.slots.seqs[slot]
            seq.token_ids.extend(drafts)
            seq.drafts = len(drafts)
            num_tokens[i] = 1 + len(drafts)
        return dataclasses.replace(plan, num_tokens=num_tokens)

    def _pool(self, batch: ForwardBatch, spans: list[tuple[int, int, int]], queued: QueuedStep) -> torch.Tensor:
        """Run a step with embedding requests' rows (``Pooler.spans``) eagerly, keeping every row's hidden state;
        the embeddings of the requests whose prompt it completes go on ``queued``. Returns the logit rows' logits."""
        hidden = self.model.hidden_states(batch, self.kv)
        slots, vectors = self.pooler.pool(hidden, spans)
        if slots:
            queued.pooled = slots, download(vectors)
        return self.model.logits(hidden[batch.logit_rows])

    @torch.inference_mode()
    def sample(self, queued: QueuedStep) -> None:
        """Queue the sampling of a step whose forward pass is queued. Every step before it must be
        finished, since bad words and grammars look at the tokens before."""
        queued.clock.mark()
        if queued.logits is not None:
            k = len(queued.rows)
            if self.sampler is None:
                if k:
                    tokens = self.tp.broadcast(torch.empty(k, dtype=torch.int64, device=self.device))
                    queued.sampled = Sampled(tokens, download(tokens), None, [])
            else:
                queued.prompt_logprobs = self._prompt_logprobs(queued.logits[k:], queued.prompt_targets)
                if k:
                    queued.grammars = self.grammar.of(queued.rows)
                    bitmask = self.grammar.bitmask_of(queued.grammars, queued.drafts)
                    queued.sampled = self.sampler.launch(
                        queued.logits[:k], queued.slots_on_device, queued.rows, bitmask, queued.offsets
                    )
                    self.tp.broadcast(queued.sampled.tokens)
            if k:
                # A slot with drafts writes several rows here; it is never read: its next step waits for this one.
                self.slots.last_tokens.index_copy_(0, queued.slots_on_device, queued.sampled.tokens)
            queued.logits = None
        queued.clock.mark()

    def finish(self, queued: QueuedStep) -> StepResult:
        """Wait for a queued step and return its results; its tokens join their sequences on the host."""
        queued.clock.wait()
        tokens, logprobs = queued.sampled.finish() if queued.sampled is not None else ([], None)
        result = StepResult(
            queued.plan.step_id,
            queued.slots,
            tokens,
            logprobs,
            self._prompt_logprob_lists(queued),
            gpu_busy_s=queued.clock.busy_s(),
            gpu_idle_s=queued.clock.idle_s(queued.before),
            embeddings=list(zip(queued.pooled[0], queued.pooled[1].tolist())) if queued.pooled else [],
        )
        if len(queued.rows) > len(queued.slots):
            self._check_drafts(queued, result)
        else:
            accept_each(queued.grammars, tokens)
            for seq, token in zip(queued.seqs, tokens):
                seq.token_ids.append(token)
        return result

    def _check_drafts(self, queued: QueuedStep, result: StepResult) -> None:
        """Keep each slot's tokens (``speculative.accepted``) of a step with drafts: its sequence drops the drafts
        and takes the kept tokens, which become ``result``'s rows, with their logprobs, and advance its grammar; the
        sampler takes back the rows it counted for tokens not kept."""
        rows, logprobs = result.token_ids, result.logprobs
        result.slots, result.token_ids, result.logprobs = [], [], [] if logprobs is not None else None
        rejected, row = [], 0
        for slot, seq in zip(queued.slots, queued.seqs):
            d = seq.drafts
            kept = accepted(seq.token_ids[len(seq.token_ids) - d :], rows[row : row + d + 1])
            if d:
                del seq.token_ids[-d:]
                seq.num_computed -= d + 1 - len(kept)
                seq.draft_computed = min(seq.draft_computed, seq.num_computed)
                seq.drafts = 0
                result.drafts.append((slot, d))
                rejected.append((slot, d + 1 - len(kept)))
            seq.token_ids.extend(kept)
            if queued.grammars:
                accept_each([queued.grammars[row]] * len(kept), kept)
            result.slots += [slot] * len(kept)
            result.token_ids += kept
            if logprobs is not None:
                result.logprobs += logprobs[row : row + len(kept)]
            row += d + 1
        if self.sampler is not None:
            self.sampler.state.rewind(rejected)

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[tuple[int, list[int]]]) -> tuple | None:
        """Queued on the device: each target's logprob and the top k of its row, from the raw logits."""
        if not targets:
            return None
        lp = logits.float().log_softmax(dim=-1)
        ids = upload([t for _, tokens in targets for t in tokens], torch.int64, lp.device)
        ns = [self.slots.seqs[slot].prompt_logprobs for slot, _ in targets]
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
