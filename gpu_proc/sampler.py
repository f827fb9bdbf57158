"""Batched sampling with per-slot parameters and per-request reproducible noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tristream.gpu_proc import ops
from tristream.gpu_proc.grammar import apply_token_bitmask
from tristream.gpu_proc.upload import download, upload, upload_named
from tristream.kernels.sampling import BIASED, FLOATS, INTS, PENALIZED
from tristream.sampling_params import SamplingParams

Logprobs = list[tuple[int, float]]


class SamplingState:
    """Sampling parameters, logit biases and penalty counts of every slot, as tensors indexed by slot id.

    ``params`` mirrors each slot's SamplingParams on the host, so deciding which
    processors a batch needs never waits for the device. The per-slot values are
    columns of two tables (``kernels.sampling.FLOATS`` and ``INTS`` name them), so that
    loading a request is two queued copies. What a request adds to its logits whatever it
    has output (``logit_bias``, ``allowed_token_ids``, one-token bad words) is its slot's
    row of ``bias``, written once when the request is loaded.
    """

    def __init__(self, max_slots: int, vocab: int, eos_token_ids: list[int], device: torch.device) -> None:
        self.device = device
        self.vocab = vocab
        self.eos_token_ids = eos_token_ids
        self.params: dict[int, SamplingParams] = {}
        self.num_outputs: dict[int, int] = {}
        self.bad_words: dict[int, list[list[int]]] = {}
        self.outputs: dict[int, list[int]] = {}
        self.counted: set[int] = set()  # penalized slots that count their own sampled tokens (not beams)
        self.watched: set[int] = set()  # slots with host-side masks: bad words of several tokens, min_tokens
        self.floats = torch.zeros(max_slots, len(FLOATS), device=device)
        self.floats[:, [FLOATS.index("top_p"), FLOATS.index("repetition")]] = 1.0
        self.temperature, self.top_p, self.min_p, self.presence, self.frequency, self.repetition = self.floats.unbind(1)
        self.ints = torch.zeros(max_slots, len(INTS), dtype=torch.int64, device=device)
        self.top_k, self.seed, self.counter, self.flags = self.ints.unbind(1)
        self.bias = torch.zeros(max_slots, vocab, device=device)
        self.counts = torch.zeros(max_slots, vocab, dtype=torch.int32, device=device)
        self.seen = torch.zeros(max_slots, vocab, dtype=torch.bool, device=device)

    def set(
        self,
        slot: int,
        params: SamplingParams,
        token_ids: list[int],
        num_outputs: int,
        bad_words_ids: list[list[int]] | None = None,
    ) -> None:
        """Load a request: the last ``num_outputs`` of ``token_ids`` are earlier outputs (a resumed request)."""
        self.params[slot] = params
        self.num_outputs[slot] = num_outputs
        self.bad_words.pop(slot, None)
        self.outputs.pop(slot, None)
        words = [w for w in bad_words_ids or () if len(w) > 1]
        if words:
            self.bad_words[slot] = words
            self.outputs[slot] = token_ids[len(token_ids) - num_outputs :]
        banned = [w[0] for w in bad_words_ids or () if len(w) == 1]
        biased = self._set_bias(slot, params, banned)
        self.floats[slot] = upload(
            [
                params.temperature,
                params.top_p,
                params.min_p,
                params.presence_penalty,
                params.frequency_penalty,
                params.repetition_penalty,
            ],
            torch.float32,
            self.device,
        )
        seed = params.seed or 0
        flags = BIASED * biased + PENALIZED * params.penalized
        self.ints[slot] = upload(
            [params.top_k, (seed ^ (seed >> 32)) & 0xFFFFFFFF, num_outputs, flags], torch.int64, self.device
        )
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        if params.penalized:
            ids = upload(token_ids, torch.int64, self.device)
            self.seen[slot, ids] = True
            if num_outputs:
                self.counts[slot].index_add_(
                    0, ids[-num_outputs:], torch.ones_like(ids[-num_outputs:], dtype=torch.int32)
                )
        self._track(slot)

    def may_speculate(self, slot: int) -> bool:
        """Whether the slot's request may check draft tokens: the scheduler gives no room for drafts to requests
        that count penalty tokens, watch for bad words of several tokens or min_tokens, or search beams."""
        return slot not in self.counted and slot not in self.watched and not self.params[slot].use_beam_search

    def _track(self, slot: int) -> None:
        """File the slot under ``counted`` and ``watched`` by its parameters."""
        p = self.params[slot]
        (self.counted.add if p.penalized and not p.use_beam_search else self.counted.discard)(slot)
        (self.watched.add if slot in self.bad_words or p.min_tokens else self.watched.discard)(slot)

    def _set_bias(self, slot: int, params: SamplingParams, banned: list[int]) -> bool:
        """Write the slot's bias row: -inf outside ``allowed_token_ids`` and on ``banned``, plus ``logit_bias``.
        Whether the request has one."""
        bias = {t: b for t, b in (params.logit_bias or {}).items() if t < self.vocab}
        if params.allowed_token_ids is None and not bias and not banned:
            return False
        row = self.bias[slot]
        allowed = [t for t in params.allowed_token_ids or () if t < self.vocab]
        row.fill_(0.0 if params.allowed_token_ids is None else float("-inf"))
        index = upload_named(self.device, allowed=allowed, banned=banned, biased=list(bias))
        row[index["allowed"]] = 0.0
        row[index["banned"]] = float("-inf")
        row.index_put_((index["biased"],), upload(list(bias.values()), torch.float32, self.device), accumulate=True)
        return True

    def copy_slots(self, pairs: list[tuple[int, int]]) -> None:
        """Give the destination of each (source, destination) pair of beam search slots (which have no bad
        words) the source's parameters, bias and counts, all read before any is written."""
        if not pairs:
            return
        read = {src: (self.params[src], self.num_outputs[src]) for src, _ in pairs}
        for src, dst in pairs:
            self.params[dst], self.num_outputs[dst] = read[src]
            self.bad_words.pop(dst, None)
            self.outputs.pop(dst, None)
            self._track(dst)
        src, dst = upload([list(p) for p in zip(*pairs)], torch.int64, self.device)
        for table in (self.floats, self.ints, self.bias, self.counts, self.seen):
            table[dst] = table[src]

    def count_chosen(self, chosen: list[tuple[int, int]]) -> None:
        """Count the token that the beam search chose for each (slot, token) of a penalized beam: a beam's
        sampled tokens are not its own (``record`` leaves them out)."""
        chosen = [(slot, token) for slot, token in chosen if self.params[slot].penalized]
        if chosen:
            self._count(*upload([list(c) for c in zip(*chosen)], torch.int64, self.device))

    def record(self, slots: torch.Tensor, slot_ids: list[int], tokens: torch.Tensor) -> list[tuple[int, list[int]]]:
        """Count the tokens just sampled on the device (penalty counts only matter to penalized slots; a beam
        search's count the tokens it chose, ``count_chosen``).

        Returns (row, output history) of the slots that watch for bad words: their tokens are
        appended once they are on the host (``Sampled.finish``)."""
        self.counter.index_add_(0, slots, torch.ones_like(slots))
        counted = [row for row, slot in enumerate(slot_ids) if slot in self.counted] if self.counted else []
        if counted:
            if len(counted) < len(slot_ids):
                rows = upload(counted, torch.int64, self.device)
                slots, tokens = slots[rows], tokens[rows]
            self._count(slots, tokens)
        for slot in slot_ids:
            self.num_outputs[slot] += 1
        return [(row, self.outputs[slot]) for row, slot in enumerate(slot_ids) if slot in self.outputs]

    def rewind(self, rows: list[tuple[int, int]]) -> None:
        """Take back, for each (slot, n), the last n rows that ``record`` counted for the slot (sampled after
        draft tokens that were rejected): their noise counter steps and outputs. Such slots count no penalties."""
        if not rows:
            return
        for slot, n in rows:
            self.num_outputs[slot] -= n
        slots, counts = upload([list(r) for r in zip(*rows)], torch.int64, self.device)
        self.counter.index_add_(0, slots, -counts)

    def _count(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add one to the count of each (slot, token) and mark it seen, as flat scatters."""
        flat = slots * self.vocab + tokens
        self.counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.seen.view(-1).scatter_(0, flat, True)

    def banned(self, slot: int) -> list[int]:
        """Tokens that would complete one of the slot's bad words of several tokens now."""
        history = self.outputs.get(slot, [])
        return [w[-1] for w in self.bad_words.get(slot, ()) if history[len(history) - len(w) + 1 :] == w[:-1]]


class Sampler:
    """Logit processors, then greedy or seeded sampling, over a batch of slots.

    Order: the grammar bitmask; the bias row (allowed_token_ids, one-token bad words, logit_bias); bad words
    of several tokens and min_tokens masks; repetition/frequency/presence penalties. Greedy rows take the
    argmax; the rest draw from their distribution divided by temperature and restricted to top-k, top-p and
    min_p (ties at a boundary are kept), by rejection rather than by sorting the vocabulary.
    """

    def __init__(self, state: SamplingState) -> None:
        self.state = state

    def process(
        self, logits: torch.Tensor, slots: torch.Tensor, slot_ids: list[int], bitmask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits after the grammar bitmask, the bias rows, bad words, min_tokens and the penalties (fp32)."""
        st = self.state
        if bitmask is not None:
            logits = apply_token_bitmask(logits.float(), bitmask)
        logits = ops.process_logits(logits, slots, st.floats, st.ints, st.bias, st.counts, st.seen)
        rows, cols = [], []
        for row, slot in enumerate(slot_ids):
            if slot not in st.watched:
                continue
            p = st.params[slot]
            masked = st.banned(slot) if slot in st.bad_words else []
            if p.min_tokens and st.num_outputs[slot] < p.min_tokens:
                masked += [*st.eos_token_ids, *p.stop_token_ids]
            rows += [row] * len(masked)
            cols += masked
        if rows:
            index = upload([rows, cols], torch.int64, logits.device)
            logits = logits.index_put((index[0], index[1]), torch.full((), float("-inf"), device=logits.device))
        return logits

    def filter(
        self,
        scaled: torch.Tensor,
        slots: torch.Tensor,
        params: list[SamplingParams],
        largest: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Temperature-scaled logits with everything outside top-k, top-p and min_p set to -inf.

        The logprobs of a sampled row come from this distribution (``nucleus_sample`` draws from it without
        writing it out). ``largest``: each row's largest scaled logits, largest first, if already known."""
        st = self.state
        inf = torch.full((), float("-inf"), device=scaled.device)
        threshold = inf.expand(scaled.shape[0])
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            k, top_p = st.top_k[slots], st.top_p[slots]
            ordered = self._ordered(scaled, params, largest)
            kth = torch.where(k > 0, ordered.gather(1, (k - 1).clamp(0, ordered.shape[1] - 1)[:, None])[:, 0], inf)
            top = ordered[:, :1]
            weights = torch.where(ordered >= kth[:, None], (ordered - top).exp(), 0.0)
            # ties at the k-th value past the ordered width still count in the top k's total
            ties = (scaled == kth[:, None]).sum(dim=-1) - (ordered == kth[:, None]).sum(dim=-1)
            probs = weights / (weights.sum(dim=-1) + ties * (kth - top[:, 0]).exp())[:, None]
            kept = ((probs.cumsum(dim=-1) - probs) < top_p[:, None]).sum(dim=-1)
            cut = torch.where(top_p < 1, ordered.gather(1, (kept - 1)[:, None])[:, 0], inf)
            threshold = torch.maximum(threshold, torch.maximum(kth, cut))
        if any(p.min_p > 0 for p in params):
            threshold = torch.maximum(threshold, scaled.max(dim=-1).values + torch.log(st.min_p[slots]))
        return scaled.masked_fill(scaled < threshold[:, None], float("-inf"))

    @staticmethod
    def _ordered(scaled: torch.Tensor, params: list[SamplingParams], largest: torch.Tensor | None) -> torch.Tensor:
        """Each sampled row's logits, largest first: only the top ``max(top_k) + 1`` (``largest`` if given) when
        every sampled row with a top_p also has a top_k (those decide both filters); the whole sorted row
        otherwise."""
        if all(p.top_k > 0 for p in params if p.top_p < 1 and p.temperature > 0):
            return largest if largest is not None else _top(scaled, params).values
        return scaled.sort(dim=-1, descending=True).values

    def __call__(self, logits: torch.Tensor, slots: torch.Tensor, slot_ids: list[int]) -> torch.Tensor:
        return self.sample(logits, slots, slot_ids)[0]

    def sample(
        self, logits: torch.Tensor, slots: torch.Tensor, slot_ids: list[int], bitmask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Logprobs | None] | None]:
        """The next token of every row, and the logprobs of the rows that ask for them, waiting for both."""
        sampled = self.launch(logits, slots, slot_ids, bitmask)
        if sampled.tokens.is_cuda:
            torch.cuda.current_stream(sampled.tokens.device).synchronize()
        return sampled.tokens, sampled.finish()[1]

    def launch(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        slot_ids: list[int],
        bitmask: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> Sampled:
        """Queue the sampling of every row on the device, and the copies of its results to the host; the host
        never waits for the device here.

        ``bitmask`` (int32, a row per slot) allows only the tokens whose bits are set. A slot may have several
        rows (one per draft token it checks): ``offsets`` then says how many outputs each row lies past its
        slot's next one, so that its noise is that of its own output position."""
        st = self.state
        params = [st.params[s] for s in slot_ids]
        logits = self.process(logits, slots, slot_ids, bitmask)
        tokens = logits.argmax(dim=-1)
        top = _top(logits, params) if any(p.top_k > 0 and p.temperature > 0 for p in params) else None
        if not all(p.temperature == 0 for p in params):
            floats, ints, rows = st.floats, st.ints, slots
            if offsets is not None:
                floats, ints, rows = st.floats[slots], st.ints[slots], torch.arange(len(slot_ids), device=slots.device)
                ints[:, INTS.index("counter")] += offsets
            sampled = ops.nucleus_sample(logits, rows, floats, ints, self._kth(top, slots))
            tokens = torch.where(st.temperature[slots] == 0, tokens, sampled)
        histories = st.record(slots, slot_ids, tokens)
        return Sampled(tokens, download(tokens), self._logprobs(logits, slots, tokens, params, top), histories)

    def _kth(self, top: Top | None, slots: torch.Tensor) -> torch.Tensor | None:
        """Each row's k-th largest logit (-inf for rows without top-k) from its ``top`` values, or None."""
        if top is None:
            return None
        k = self.state.top_k[slots]
        kth = top.values.gather(1, (k.clamp(1, top.values.shape[1]) - 1)[:, None])[:, 0]
        return torch.where(k > 0, kth, float("-inf"))

    def _logprobs(self, logits: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor, params, top):
        """For ``Sampled.logprobs``: each row's logprobs count, and on their way to the host, for the rows that
        ask, the sampled tokens, their logprobs, and the top k ids and logprobs (of the processed logits for a
        greedy row, of the filtered scaled ones for a sampled row); None if no row asks. ``top``: each row's
        largest logits, if known; their order is that of both distributions, so it gives the top k ids."""
        wanted = [p.step_logprobs for p in params]
        rows = [i for i, n in enumerate(wanted) if n is not None]
        if not rows:
            return None
        index = upload(rows, torch.int64, logits.device)
        raw, at = logits[index], slots[index]
        temperature = self.state.temperature[at][:, None]
        divisor = temperature.clamp_min(1e-6)
        largest = None if top is None else top.values[index] / divisor  # dividing by a temperature keeps the order
        scaled = self.filter(raw / divisor, at, [params[i] for i in rows], largest)
        lp = torch.where(temperature == 0, raw, scaled).log_softmax(dim=-1)
        chosen = tokens[index]
        picked = lp.gather(1, chosen[:, None])[:, 0]
        k = max(wanted[i] for i in rows)
        if top is not None and k <= top.indices.shape[1]:
            top_ids = top.indices[index][:, :k]
        else:
            top_ids = lp.topk(k, dim=-1).indices if k else chosen[:, None][:, :0]
        top_values = lp.gather(1, top_ids)
        return wanted, download(chosen), download(picked), download(top_ids), download(top_values)


Top = torch.return_types.topk


def _top(logits: torch.Tensor, params: list[SamplingParams]) -> Top:
    """Each row's largest ``max(top_k) + 1`` logits (the top_k of the sampled rows) and their ids, largest
    first."""
    width = max((p.top_k for p in params if p.temperature > 0), default=0) + 1
    return logits.topk(min(width, logits.shape[-1]), dim=-1)


@dataclass
class Sampled:
    """A sampling queued on the device. ``host_tokens`` and the logprob tensors are copies on
    their way to the host: read them (``finish``) once the device has passed this step."""

    tokens: torch.Tensor
    host_tokens: torch.Tensor
    logprobs: tuple[list[int | None], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    histories: list[tuple[int, list[int]]]

    def finish(self) -> tuple[list[int], list[Logprobs | None] | None]:
        """The tokens as ints, with each bad-words history extended by its row's token, and the logprobs:
        [(sampled token, logprob), then the top k] for rows with ``logprobs=k``, None for the others."""
        tokens = self.host_tokens.tolist()
        for row, history in self.histories:
            history.append(tokens[row])
        if self.logprobs is None:
            return tokens, None
        wanted, *on_host = self.logprobs
        chosen, picked, top_ids, top_values = (t.tolist() for t in on_host)
        out: list[Logprobs | None] = [None] * len(wanted)
        j = 0
        for i, n in enumerate(wanted):
            if n is not None:
                out[i] = [(chosen[j], picked[j])] + list(zip(top_ids[j][:n], top_values[j][:n]))
                j += 1
        return tokens, out
