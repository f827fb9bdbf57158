"""Batched sampling with per-slot parameters and per-request reproducible noise."""

from __future__ import annotations

import torch

from tristream.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, vocab] that depends only on (seed, counter, token id).

    So a seeded request draws the same numbers whatever else shares its batch.
    """
    row = _mix32(seeds ^ _mix32(counters + 0x9E3779B9))
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32((row[:, None] + cols[None, :] * 0x9E3779B1) & _MASK32) >> 9
    return (bits.float() + 0.5) / float(1 << 23)  # 23 bits: exact in fp32, never 0 or 1


class SamplingState:
    """Sampling parameters of every slot as tensors, indexed by slot id."""

    def __init__(self, max_slots: int, device: torch.device) -> None:
        self.temperature = torch.zeros(max_slots, device=device)
        self.top_p = torch.ones(max_slots, device=device)
        self.top_k = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self.seed = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self.counter = torch.zeros(max_slots, dtype=torch.int64, device=device)

    def set(self, slot: int, params: SamplingParams, num_outputs: int) -> None:
        """Load a request's parameters; ``num_outputs`` resumes its noise stream."""
        self.temperature[slot] = params.temperature
        self.top_p[slot] = params.top_p
        self.top_k[slot] = params.top_k
        seed = params.seed or 0
        self.seed[slot] = (seed ^ (seed >> 32)) & _MASK32
        self.counter[slot] = num_outputs


class Sampler:
    """Greedy, temperature, top-k and top-p sampling over a batch of slots."""

    def __init__(self, state: SamplingState) -> None:
        self.state = state

    def __call__(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        st = self.state
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        temperature = st.temperature[slots]
        if bool((temperature == 0).all()):
            st.counter[slots] += 1
            return greedy
        scaled = logits / temperature.clamp_min(1e-6)[:, None]
        top_k, top_p = st.top_k[slots], st.top_p[slots]
        if bool((top_k > 0).any() or (top_p < 1).any()):
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        noise = uniform_noise(st.seed[slots], st.counter[slots], logits.shape[-1])
        sampled = (scaled - torch.log(-torch.log(noise))).argmax(dim=-1)
        st.counter[slots] += 1
        return torch.where(temperature == 0, greedy, sampled)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k, then outside the top-p nucleus of what is left."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
