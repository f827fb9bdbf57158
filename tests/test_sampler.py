"""Tests for the batched sampler and its per-request noise."""

from __future__ import annotations

import pytest
import torch

from tristream import SamplingParams
from tristream.gpu_proc.sampler import Sampler, SamplingState
from tristream.kernels.sampling import uniform_noise

CPU = torch.device("cpu")
VOCAB = 1000  # at least every vocabulary the tests sample from


def i64(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ---------------------------------------------------------------- uniform_noise


def test_noise_strictly_inside_unit_interval_over_a_large_draw() -> None:
    """2**26 values: any value that can come out at all (1 in 2**24) is likely to appear here."""
    rows, vocab = 512, 16384
    lo, hi = 1.0, 0.0
    for chunk in range(8):
        counters = torch.arange(chunk * rows, (chunk + 1) * rows, dtype=torch.int64)
        noise = uniform_noise(torch.full_like(counters, 7), counters, vocab)
        assert noise.dtype == torch.float32 and noise.shape == (rows, vocab)
        lo, hi = min(lo, noise.min().item()), max(hi, noise.max().item())
    assert lo > 0.0
    assert hi < 1.0, f"uniform_noise produced {hi!r}, so -log(-log(u)) is infinite"


def test_noise_is_roughly_uniform() -> None:
    seeds = i64([11, 12, 13, 14] * 64)
    counters = torch.arange(256, dtype=torch.int64)
    noise = uniform_noise(seeds, counters, 4096).flatten().double()  # 2**20 values
    assert abs(noise.mean().item() - 0.5) < 2e-3
    assert abs(noise.var().item() - 1 / 12) < 2e-3
    hist = torch.histc(noise, bins=20, min=0.0, max=1.0) / noise.numel()
    # each bin's fraction has a standard deviation of about 2e-4 here
    assert (hist - 0.05).abs().max().item() < 2e-3
    # neighbouring columns of one row are not correlated
    a, b = noise.view(256, 4096)[:, :-1].flatten(), noise.view(256, 4096)[:, 1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 1e-2


def test_noise_row_depends_only_on_seed_and_counter() -> None:
    vocab = 1000
    pairs = [(5, 0), (5, 1), (6, 0), (123456789, 42), (0xFFFFFFFF, 7)]
    alone = [uniform_noise(i64([s]), i64([c]), vocab)[0] for s, c in pairs]
    batch = uniform_noise(i64([s for s, _ in pairs]), i64([c for _, c in pairs]), vocab)
    for i in range(len(pairs)):
        assert torch.equal(batch[i], alone[i])
    order = [3, 0, 4, 2, 1]
    shuffled = uniform_noise(i64([pairs[i][0] for i in order]), i64([pairs[i][1] for i in order]), vocab)
    for row, i in enumerate(order):
        assert torch.equal(shuffled[row], alone[i])
    # among unrelated rows too
    mixed = uniform_noise(i64([99, pairs[3][0], 98]), i64([3, pairs[3][1], 4]), vocab)
    assert torch.equal(mixed[1], alone[3])
    # a wider vocab extends the row: column j depends on the token id, not the width
    assert torch.equal(uniform_noise(i64([5]), i64([1]), 2 * vocab)[0, :vocab], alone[1])


def test_noise_differs_between_seeds_and_counters() -> None:
    vocab = 512
    rows = [(s, c) for s in (0, 1, 2, 1 << 31) for c in (0, 1, 2, 1000)]
    noise = uniform_noise(i64([s for s, _ in rows]), i64([c for _, c in rows]), vocab)
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            same = (noise[i] == noise[j]).float().mean().item()
            assert same < 0.01, (rows[i], rows[j])


# ---------------------------------------------------------------- Sampler


def make_sampler(slot_params: dict[int, SamplingParams], max_slots: int = 16) -> Sampler:
    state = SamplingState(max_slots, VOCAB, [], CPU)
    for slot, params in slot_params.items():
        state.set(slot, params, [0], 0)
    return Sampler(state)


def draws(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """``n`` draws from one logits row [V]: one slot per draw, each at its own counter."""
    state = SamplingState(n, VOCAB, [], CPU)
    for i in range(n):
        state.set(i, params, [0], i)
    return Sampler(state)(logits.expand(n, -1), torch.arange(n), list(range(n)))


def test_greedy_rows_take_argmax_when_mixed_with_sampled_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    greedy, sampled = SamplingParams(temperature=0.0, seed=1), SamplingParams(temperature=1.5, seed=2)
    sampler = make_sampler({0: greedy, 1: sampled, 2: greedy, 3: sampled, 4: greedy})
    slots = torch.tensor([0, 1, 2, 3, 4])
    differs = 0
    for _ in range(20):
        logits = torch.randn(5, 300, generator=gen)
        tokens = sampler(logits, slots, slots.tolist())
        assert tokens.shape == (5,)
        for row in (0, 2, 4):
            assert tokens[row].item() == logits[row].argmax().item()
        differs += int(tokens[1] != logits[1].argmax()) + int(tokens[3] != logits[3].argmax())
    assert differs > 0  # the sampled rows really sample


def test_all_greedy_batch_returns_argmax() -> None:
    gen = torch.Generator().manual_seed(1)
    sampler = make_sampler({s: SamplingParams(temperature=0.0) for s in range(4)})
    logits = torch.randn(4, 1000, generator=gen)
    assert torch.equal(sampler(logits, torch.tensor([3, 1, 0, 2]), [3, 1, 0, 2]), logits.argmax(-1))


def test_seeded_row_is_the_same_alone_or_in_a_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    steps, vocab = 12, 200
    mine = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=987654321987)
    my_logits = [2 * torch.randn(vocab, generator=gen) for _ in range(steps)]

    alone = make_sampler({0: mine})
    seq_alone = [alone(my_logits[t][None], torch.tensor([0]), [0]).item() for t in range(steps)]

    others = {
        0: SamplingParams(temperature=1.0, seed=1),
        1: SamplingParams(temperature=0.0, seed=2),
        2: SamplingParams(temperature=0.7, top_p=0.5, seed=3),
        4: SamplingParams(temperature=1.3, top_k=5, seed=4),
    }
    batched = make_sampler({**others, 7: mine})
    seq_batch = []
    for t in range(steps):
        # the other slots and the row order change from step to step
        slots = [7, 0, 1, 2, 4][: 2 + t % 4]
        if t % 2:
            slots.reverse()
        logits = 2 * torch.randn(len(slots), vocab, generator=gen)
        logits[slots.index(7)] = my_logits[t]
        seq_batch.append(batched(logits, torch.tensor(slots), slots)[slots.index(7)].item())
    assert seq_batch == seq_alone

    # resuming at output k (after a preemption) continues the same stream
    resumed = SamplingState(1, VOCAB, [], CPU)
    resumed.set(0, mine, [0], 5)
    seq_resumed = [Sampler(resumed)(my_logits[t][None], torch.tensor([0]), [0]).item() for t in range(5, steps)]
    assert seq_resumed == seq_alone[5:]

    # and another seed gives another sequence
    other = make_sampler({0: SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=5)})
    assert [other(my_logits[t][None], torch.tensor([0]), [0]).item() for t in range(steps)] != seq_alone


def test_top_k_1_is_greedy() -> None:
    gen = torch.Generator().manual_seed(3)
    params = {s: SamplingParams(temperature=t, top_k=1, seed=s) for s, t in enumerate([0.5, 1.0, 2.0, 10.0])}
    sampler = make_sampler(params)
    for _ in range(10):
        logits = torch.randn(4, 500, generator=gen)
        assert torch.equal(sampler(logits, torch.arange(4), [0, 1, 2, 3]), logits.argmax(-1))


@pytest.mark.parametrize("k", [2, 5, 20])
def test_top_k_draws_stay_in_top_k(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(64, generator=gen)
    tokens = draws(logits, SamplingParams(temperature=1.5, top_k=k, seed=k), 4000)
    top = set(logits.topk(k).indices.tolist())
    assert set(tokens.tolist()) == top  # inside the top k, and each of them is reached


def test_small_top_p_draws_only_the_top_token() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(50, generator=gen)
    tokens = draws(logits, SamplingParams(temperature=1.0, top_p=0.01, seed=4), 3000)
    assert (tokens == logits.argmax()).all()


def test_top_p_draws_stay_in_the_nucleus_with_renormalized_frequencies() -> None:
    logits = torch.tensor([2.0, 1.6, 1.1, 0.9, 0.3, 0.0, -0.5, -1.0, -1.2, -2.0])
    top_p = 0.9
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    nucleus, total = [], 0.0
    for token in order:  # the smallest set of top tokens whose probability reaches top_p
        nucleus.append(token)
        total += probs[token].item()
        if total >= top_p:
            break
    assert abs(total - top_p) > 0.01 and len(nucleus) < len(order)
    n = 20000
    tokens = draws(logits, SamplingParams(temperature=1.0, top_p=top_p, seed=77), n)
    assert set(tokens.tolist()) == set(nucleus)
    freq = torch.bincount(tokens, minlength=len(logits)).double() / n
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert (freq - expected).abs().max().item() < 0.015


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_frequencies_match_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.3, 2.0, -1.0, 0.2, 1.4])
    n = 20000
    tokens = draws(logits, SamplingParams(temperature=temperature, seed=2024), n)
    freq = torch.bincount(tokens, minlength=8).double() / n
    expected = (logits.double() / temperature).softmax(-1)
    # a frequency's standard deviation is at most sqrt(0.25 / 20000) ~ 0.0035
    assert (freq - expected).abs().max().item() < 0.015


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.3, 2.0, -1.0, 0.2, 1.4])
    n = 20000

    def entropy_and_top(temperature: float) -> tuple[float, float]:
        tokens = draws(logits, SamplingParams(temperature=temperature, seed=9), n)
        freq = torch.bincount(tokens, minlength=8).double() / n
        nz = freq[freq > 0]
        return -(nz * nz.log()).sum().item(), freq[logits.argmax()].item()

    cold, warm, hot = entropy_and_top(0.3), entropy_and_top(1.0), entropy_and_top(3.0)
    assert cold[0] < warm[0] < hot[0]
    assert cold[1] > warm[1] > hot[1]
    assert hot[1] > 1 / 8  # still favours the top token


def test_counter_advances_per_sampled_step() -> None:
    state = SamplingState(3, VOCAB, [], CPU)
    state.set(0, SamplingParams(temperature=1.0, seed=1), [0], 4)
    state.set(1, SamplingParams(temperature=0.0, seed=2), [0], 0)
    state.set(2, SamplingParams(temperature=1.0, seed=3), [0], 10)
    sampler = Sampler(state)
    logits = torch.zeros(2, 10)
    sampler(logits, torch.tensor([0, 1]), [0, 1])
    sampler(logits, torch.tensor([1]), [1])
    assert state.counter.tolist() == [5, 2, 10]


def test_top_p_applies_to_the_renormalized_top_k_set() -> None:
    """top_k=2 keeps probabilities 0.4 and 0.2 (0.67 and 0.33 after renormalizing); top_p=0.5 then keeps one."""
    probs = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.1, 0.1])
    logits = probs.log()[None, :].repeat(64, 1)
    state = SamplingState(64, VOCAB, [], CPU)
    for slot in range(64):
        state.set(slot, SamplingParams(temperature=1.0, top_k=2, top_p=0.5, seed=slot), [0], 0)
    drawn = set()
    for _ in range(20):
        drawn |= set(Sampler(state)(logits, torch.arange(64), list(range(64))).tolist())
    assert drawn == {0}
