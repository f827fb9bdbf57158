"""Seeded sampling kernels: Gumbel-max noise hashed from (seed, counter, token id), so a seeded request draws
the same numbers whatever else shares its batch; the logit processors fused in one pass; and top-k/top-p/min_p
sampling without sorting the vocabulary. Each Triton kernel sits beside its torch reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MASK32 = 0xFFFFFFFF
# Rounds of nucleus rejection sampling before a row takes its most likely token. Each rejected draw removes
# every token at or below it; the mass left above the pivot shrinks about twofold a round, so a row that is
# still drawing after this many rounds has a probability far below float rounding.
MAX_ROUNDS = 64
# Column order of SamplingState's per-slot tables, read by the kernels.
FLOATS = ("temperature", "top_p", "min_p", "presence", "frequency", "repetition")
INTS = ("top_k", "seed", "counter", "flags")
BIASED, PENALIZED = 1, 2


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_hash(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One 32-bit value per row (int64) from its 32-bit seed and its counter."""
    return _mix32(seeds ^ _mix32(counters + 0x9E3779B9))


def round_hash(row: torch.Tensor, round: int) -> torch.Tensor:
    """The noise key of a row's ``round``-th draw: the row's own for the first."""
    return row if round == 0 else _mix32((row + round * 0x632BE5AB) & _MASK32)


def noise_at(keys: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise at token ids ``cols`` for row keys ``keys`` (int64, broadcast together)."""
    bits = _mix32((keys + cols * 0x9E3779B1) & _MASK32) >> 9
    return (bits.float() + 0.5) / float(1 << 23)  # 23 bits: exact in fp32, never 0 or 1


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, vocab] that depends only on (seed, counter, token id)."""
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    return noise_at(row_hash(seeds, counters)[:, None], cols[None, :])


@triton.jit
def _mix32_tl(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _gumbel_tl(x, key, cols):
    """``x`` plus the Gumbel noise of key ``key`` at token ids ``cols``."""
    bits = _mix32_tl((key + cols * 0x9E3779B1) & 0xFFFFFFFF) >> 9
    u = (bits.to(tl.float32) + 0.5) / 8388608.0
    return x - tl.log(-tl.log(u))


def process_logits_ref(
    logits: torch.Tensor,
    slots: torch.Tensor,
    floats: torch.Tensor,
    ints: torch.Tensor,
    bias: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
) -> torch.Tensor:
    """fp32 logits [B, V] plus the bias row of each biased slot, then, for each penalized slot, the repetition
    penalty on the tokens it has seen and the frequency and presence penalties on the tokens it has output.

    ``floats``/``ints`` are the per-slot tables whose columns :data:`FLOATS`/:data:`INTS` name."""
    out = logits.float()
    flags = ints[slots, INTS.index("flags")]
    biased = torch.nonzero(flags & BIASED).flatten()
    if biased.numel():
        out = out.index_put((biased,), out[biased] + bias[slots[biased]])
    penalized = torch.nonzero(flags & PENALIZED).flatten()
    if penalized.numel():
        s = slots[penalized]
        presence, frequency, repetition = (floats[s, FLOATS.index(name)][:, None] for name in FLOATS[3:])
        x = out[penalized]
        x = torch.where(seen[s], torch.where(x > 0, x / repetition, x * repetition), x)
        c = counts[s].float()
        out = out.index_put((penalized,), x - frequency * c - presence * (c > 0))
    return out


@triton.jit
def _process_kernel(
    logits_ptr, out_ptr, slots_ptr, floats_ptr, ints_ptr, bias_ptr, counts_ptr, seen_ptr, stride,
    VOCAB: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (b, j) processes block j of row b, reading the slot's tables only where its flags ask."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < VOCAB
    x = tl.load(logits_ptr + b * stride + cols, mask=mask).to(tl.float32)
    slot = tl.load(slots_ptr + b)
    flags = tl.load(ints_ptr + slot * 4 + 3)
    if (flags & 1) != 0:
        x += tl.load(bias_ptr + slot * VOCAB + cols, mask=mask)
    if (flags & 2) != 0:
        presence = tl.load(floats_ptr + slot * 6 + 3)
        frequency = tl.load(floats_ptr + slot * 6 + 4)
        repetition = tl.load(floats_ptr + slot * 6 + 5)
        seen = tl.load(seen_ptr + slot * VOCAB + cols, mask=mask) != 0
        x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, repetition), x * repetition), x)
        c = tl.load(counts_ptr + slot * VOCAB + cols, mask=mask).to(tl.float32)
        x = x - frequency * c - presence * (c > 0).to(tl.float32)
    tl.store(out_ptr + b * VOCAB + cols, x, mask=mask)


def process_logits(
    logits: torch.Tensor,
    slots: torch.Tensor,
    floats: torch.Tensor,
    ints: torch.Tensor,
    bias: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
) -> torch.Tensor:
    """Triton :func:`process_logits_ref`: one pass over the logits, any float dtype in, fp32 out."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [B, V] with a unit stride in its last dim")
    batch, vocab = logits.shape
    out = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(vocab), 2048)
    _process_kernel[(batch, triton.cdiv(vocab, block))](
        logits, out, slots, floats, ints, bias, counts, seen.view(torch.uint8), logits.stride(0),
        VOCAB=vocab, BLOCK=block, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def nucleus_sample_ref(
    logits: torch.Tensor, slots: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor, kth: torch.Tensor | None
) -> torch.Tensor:
    """A sample per row of softmax(logits / temperature) restricted to top-k, top-p and min_p, without sorting.

    ``kth`` holds each row's k-th largest logit (-inf without top-k). Rejection sampling: a Gumbel-max draw
    among the tokens above the last rejected one (and at or above the top-k and min_p floors) is kept when
    the probability of the tokens strictly above it, renormalized over the top k, is below top_p (the draw
    lies in the nucleus); otherwise every token at or below it is dropped and the row draws again with the
    next round's noise. Rows of temperature 0 get -1."""
    column = {name: floats[slots, i] for i, name in enumerate(FLOATS)}
    temperature, top_p = column["temperature"].clamp_min(1e-6), column["top_p"]
    s = logits / temperature[:, None]
    kth_s = torch.full_like(temperature, float("-inf")) if kth is None else kth / temperature
    m, fallback = s.max(dim=-1)
    e = (s - m[:, None]).exp()
    z = torch.where(s >= kth_s[:, None], e, 0.0).sum(dim=-1)
    floor = torch.maximum(kth_s, m + column["min_p"].log())
    key = row_hash(ints[slots, INTS.index("seed")], ints[slots, INTS.index("counter")])
    token = torch.full_like(fallback, -1)
    pivot = torch.full_like(temperature, float("-inf"))
    live = torch.nonzero(column["temperature"] > 0).flatten()
    for r in range(MAX_ROUNDS):
        if not live.numel():
            break
        drawn = _masked_gumbel_argmax(s[live], floor[live], pivot[live], round_hash(key[live], r))
        level = s[live, drawn]
        mass = torch.where(s[live] > level[:, None], e[live], 0.0).sum(dim=-1)
        kept = (top_p[live] >= 1) | (mass < top_p[live] * z[live])
        token[live[kept]] = drawn[kept]
        pivot[live[~kept]] = level[~kept]
        live = live[~kept]
    token[live] = fallback[live]
    return token


def _masked_gumbel_argmax(s: torch.Tensor, floor: torch.Tensor, pivot: torch.Tensor, keys: torch.Tensor):
    """Per row, the first token of the maximal ``s`` plus the noise of its key, among the tokens at or above
    ``floor`` and above ``pivot`` (noise drawn for those alone); token 0 for a row where no token is (every
    logit -inf: all masked), as the kernel gives."""
    rows, cols = torch.nonzero((s >= floor[:, None]) & (s > pivot[:, None]), as_tuple=True)
    g = s[rows, cols] - torch.log(-torch.log(noise_at(keys[rows], cols)))
    best = torch.full_like(floor, float("-inf")).scatter_reduce(0, rows, g, "amax")
    top = g == best[rows]
    first = torch.full_like(keys, s.shape[-1]).scatter_reduce(0, rows[top], cols[top], "amin")
    return torch.where(first < s.shape[-1], first, 0)


@triton.jit
def _masked_gumbel_argmax_tl(x_ptr, temperature, floor, pivot, key, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """The first token of the maximal scaled logit plus noise among those at or above ``floor`` and above
    ``pivot``."""
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    for start in range(0, VOCAB, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        s = tl.math.div_rn(tl.load(x_ptr + cols, mask=cols < VOCAB, other=float("-inf")), temperature)
        g = tl.where((s >= floor) & (s > pivot), _gumbel_tl(s, key, cols), float("-inf"))
        m = tl.max(g, 0)
        take = m > best
        best_idx = tl.where(take, start + tl.argmax(g, 0), best_idx)
        best = tl.where(take, m, best)
    return best_idx


@triton.jit
def _mass_above_tl(x_ptr, temperature, level, top, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """The sum of exp(s - top) over the scaled logits s above ``level``."""
    mass = tl.zeros((), tl.float32)
    for start in range(0, VOCAB, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        s = tl.math.div_rn(tl.load(x_ptr + cols, mask=cols < VOCAB, other=float("-inf")), temperature)
        mass += tl.sum(tl.where(s > level, tl.exp(s - top), 0.0), 0)
    return mass


@triton.jit
def _max_and_mass_tl(x_ptr, temperature, kth, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """The largest scaled logit, its first token, and the sum of exp(s - largest) over s at or above ``kth``."""
    top = tl.full((), float("-inf"), tl.float32)
    arg = tl.zeros((), tl.int64)
    z = tl.zeros((), tl.float32)
    for start in range(0, VOCAB, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        s = tl.math.div_rn(tl.load(x_ptr + cols, mask=cols < VOCAB, other=float("-inf")), temperature)
        block_top = tl.max(s, 0)
        new_top = tl.maximum(top, block_top)
        arg = tl.where(block_top > top, start + tl.argmax(s, 0), arg)
        rescale = tl.where(new_top == top, 1.0, tl.exp(top - new_top))
        z = z * rescale + tl.sum(tl.where((s >= kth) & (s > float("-inf")), tl.exp(s - new_top), 0.0), 0)
        top = new_top
    return top, arg, z


@triton.jit
def _nucleus_kernel(
    x_ptr, slots_ptr, floats_ptr, ints_ptr, kth_ptr, out_ptr, stride,
    HAS_KTH: tl.constexpr, MAX_ROUNDS: tl.constexpr, VOCAB: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program b draws row b as :func:`nucleus_sample_ref` does: a pass for the maximum and the top-k mass
    (only with top_p or min_p), then a draw and, with top_p, a pass for the mass above it, per round."""
    b = tl.program_id(0).to(tl.int64)
    x_ptr += b * stride
    slot = tl.load(slots_ptr + b)
    raw_temperature = tl.load(floats_ptr + slot * 6)
    token = tl.full((), -1, tl.int64)
    if raw_temperature > 0:
        temperature = tl.maximum(raw_temperature, 1e-6)
        top_p = tl.load(floats_ptr + slot * 6 + 1)
        min_p = tl.load(floats_ptr + slot * 6 + 2)
        kth = tl.full((), float("-inf"), tl.float32)
        if HAS_KTH:
            kth = tl.math.div_rn(tl.load(kth_ptr + b), temperature)
        top = tl.full((), float("-inf"), tl.float32)
        fallback = tl.zeros((), tl.int64)
        z = tl.zeros((), tl.float32)
        if (top_p < 1) | (min_p > 0):
            top, fallback, z = _max_and_mass_tl(x_ptr, temperature, kth, VOCAB, BLOCK)
        floor = tl.maximum(kth, tl.where(min_p > 0, top + tl.log(tl.maximum(min_p, 1e-30)), float("-inf")))
        counter = tl.load(ints_ptr + slot * 4 + 2)
        key = _mix32_tl(tl.load(ints_ptr + slot * 4 + 1) ^ _mix32_tl(counter + 0x9E3779B9))
        pivot = tl.full((), float("-inf"), tl.float32)
        r = tl.zeros((), tl.int64)
        while (token < 0) & (r < MAX_ROUNDS):
            round_key = tl.where(r == 0, key, _mix32_tl((key + r * 0x632BE5AB) & 0xFFFFFFFF))
            drawn = _masked_gumbel_argmax_tl(x_ptr, temperature, floor, pivot, round_key, VOCAB, BLOCK)
            if top_p < 1:
                level = tl.math.div_rn(tl.load(x_ptr + drawn), temperature)
                if _mass_above_tl(x_ptr, temperature, level, top, VOCAB, BLOCK) < top_p * z:
                    token = drawn
                else:
                    pivot = level
            else:
                token = drawn
            r += 1
        token = tl.where(token < 0, fallback, token)
    tl.store(out_ptr + b, token)


def nucleus_sample(
    logits: torch.Tensor, slots: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor, kth: torch.Tensor | None
) -> torch.Tensor:
    """Triton :func:`nucleus_sample_ref`: fp32 logits [B, V] -> int64 [B], noise never stored."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError("logits must be fp32 [B, V] with a unit stride in its last dim")
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    block = min(triton.next_power_of_2(logits.shape[1]), 4096)
    _nucleus_kernel[(logits.shape[0],)](
        logits, slots, floats, ints, out if kth is None else kth, out, logits.stride(0),
        HAS_KTH=kth is not None, MAX_ROUNDS=MAX_ROUNDS, VOCAB=logits.shape[1], BLOCK=block, num_warps=8,
    )  # fmt: skip
    return out
