"""Logit processors against plain float64 references computed from the raw logits."""

from __future__ import annotations

import math

import torch

from tristream import SamplingParams
from tristream.gpu_proc.sampler import Sampler, SamplingState

CPU = torch.device("cpu")
VOCAB = 64
EOS = 3


def sampler_for(params: list[SamplingParams], histories: list[tuple[list[int], list[int]]] | None = None) -> Sampler:
    """A sampler whose slot i holds params[i], with (prompt, outputs) histories."""
    state = SamplingState(len(params), VOCAB, [EOS], CPU)
    for slot, p in enumerate(params):
        prompt, outputs = histories[slot] if histories else ([0], [])
        state.set(slot, p, prompt + outputs, len(outputs))
    return Sampler(state)


def test_penalties_match_their_formulas_on_a_mixed_batch():
    gen = torch.Generator().manual_seed(0)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.8, frequency_penalty=0.4),
        SamplingParams(repetition_penalty=0.7, presence_penalty=-0.5, frequency_penalty=1.5),
        SamplingParams(),
    ]
    histories = [
        (torch.randint(0, VOCAB, (n,), generator=gen).tolist(), torch.randint(0, VOCAB, (m,), generator=gen).tolist())
        for n, m in ((5, 9), (3, 12), (10, 4), (6, 6))
    ]
    sampler = sampler_for(params, histories)
    logits = 3 * torch.randn(4, VOCAB, generator=gen)
    got = sampler.process(logits, torch.arange(4), [0, 1, 2, 3])
    for row, (p, (prompt, outputs)) in enumerate(zip(params, histories)):
        ref = logits[row].double().clone()
        for token in set(prompt) | set(outputs):
            ref[token] = ref[token] / p.repetition_penalty if ref[token] > 0 else ref[token] * p.repetition_penalty
        for token in set(outputs):
            ref[token] -= p.frequency_penalty * outputs.count(token) + p.presence_penalty
        assert torch.allclose(got[row].double(), ref, atol=1e-5), row


def test_penalties_follow_tokens_sampled_later():
    sampler = sampler_for([SamplingParams(temperature=0, frequency_penalty=2.0)])
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 5.0
    first = sampler(logits, torch.arange(1), [0]).item()
    assert first == 7
    assert sampler.process(logits, torch.arange(1), [0])[0, 7].item() == 5.0 - 2.0


def test_logit_bias_adds_to_the_named_tokens_only():
    sampler = sampler_for([SamplingParams(logit_bias={5: 10.0, 9: -100.0, 10_000: 1.0}), SamplingParams()])
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    got = sampler.process(logits, torch.arange(2), [0, 1])
    expected = logits.clone()
    expected[0, 5] += 10.0
    expected[0, 9] -= 100.0
    assert torch.equal(got, expected)


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[11])
    sampler = sampler_for([p])
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 11], logits[0, 20] = 9.0, 8.0, 1.0
    tokens = [sampler(logits, torch.arange(1), [0]).item() for _ in range(4)]
    assert tokens == [20, 20, 20, EOS]


def reference_kept(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens top-k, top-p and min_p keep, ties at each boundary included, in float64."""
    scaled = logits.double() / p.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if p.top_k:
        kth = scaled.sort(descending=True).values[p.top_k - 1]
        keep &= scaled >= kth
    if p.top_p < 1:
        masked = scaled.masked_fill(~keep, -math.inf)
        ordered = masked.sort(descending=True).values
        probs = ordered.softmax(-1)
        total, cutoff = 0.0, ordered[0]
        for value, prob in zip(ordered.tolist(), probs.tolist()):
            cutoff = value
            total += prob
            if total >= p.top_p:
                break
        keep &= scaled >= cutoff
    if p.min_p:
        probs = scaled.softmax(-1)
        keep &= probs >= p.min_p * probs.max()
    return set(torch.nonzero(keep).flatten().tolist())


def test_top_k_top_p_min_p_keep_exactly_the_reference_set_with_ties():
    tied = torch.tensor([5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 2.0, 1.0] + [0.0] * (VOCAB - 8))
    gen = torch.Generator().manual_seed(3)
    cases = [
        (tied, SamplingParams(top_k=2)),
        (tied, SamplingParams(top_k=5)),
        (tied, SamplingParams(top_p=0.5)),
        (tied, SamplingParams(top_p=0.9, top_k=6)),
        (tied, SamplingParams(min_p=0.3)),
        (tied, SamplingParams(temperature=0.5, min_p=0.1, top_p=0.95)),
    ]
    cases += [
        (2 * torch.randn(VOCAB, generator=gen), SamplingParams(temperature=t, top_k=k, top_p=tp, min_p=mp))
        for t, k, tp, mp in ((0.7, 10, 0.8, 0.0), (1.3, 0, 0.6, 0.05), (1.0, 20, 1.0, 0.2), (0.9, 3, 0.99, 0.01))
    ]
    cases += [
        (tied, SamplingParams(top_k=3, top_p=0.7)),
        (tied, SamplingParams(top_k=1, top_p=0.5)),
        (tied, SamplingParams()),
        (2 * torch.randn(VOCAB, generator=gen), SamplingParams(top_k=12, top_p=0.5)),
    ]
    # The whole batch sorts every row; the subset where each top_p comes with a top_k takes the top-k path.
    short = [c for c in cases if c[1].top_p == 1 or c[1].top_k > 0]
    for batch in (cases, short, [c for c in short if c[0] is not tied]):
        params = [p for _, p in batch]
        sampler = sampler_for(params)
        logits = torch.stack([row for row, _ in batch])
        temperature = torch.tensor([p.temperature for p in params])
        scaled = sampler.filter(logits / temperature[:, None], torch.arange(len(batch)), params)
        for row, (raw, p) in enumerate(batch):
            assert set(torch.nonzero(torch.isfinite(scaled[row])).flatten().tolist()) == reference_kept(raw, p), p


def test_sampled_frequencies_match_the_processed_distribution():
    """Chi-square over 8 000 seeded draws (the noise stream advances each draw)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0] + [-9.0] * (VOCAB - 8))
    p = SamplingParams(temperature=0.8, top_k=6, seed=1234)
    sampler = sampler_for([p])
    draws = 8000
    counts = torch.zeros(VOCAB)
    for _ in range(draws):
        counts[sampler(logits[None], torch.arange(1), [0]).item()] += 1
    kept = sorted(reference_kept(logits, p))
    probs = (logits.double()[kept] / p.temperature).softmax(-1)
    assert counts.sum().item() == counts[kept].sum().item() == draws
    expected = probs * draws
    chi2 = (((counts[kept].double() - expected) ** 2) / expected).sum().item()
    assert chi2 < 20.52, chi2  # the 0.999 quantile of chi-square with 5 degrees of freedom


def test_bad_words_ban_the_last_token_only_after_the_rest_of_the_phrase():
    state = SamplingState(1, VOCAB, [EOS], CPU)
    state.set(0, SamplingParams(temperature=0), [1, 2, 20], 1, bad_words_ids=[[9], [20, 21]])  # output so far: [20]
    sampler = Sampler(state)
    logits = torch.zeros(1, VOCAB)
    logits[0, 9], logits[0, 21], logits[0, 30] = 9.0, 8.0, 7.0
    tokens = [sampler(logits, torch.arange(1), [0]).item() for _ in range(2)]
    assert tokens == [30, 21]  # 9 is always banned; 21 only right after 20


def test_logprobs_are_log_softmax_of_the_processed_distribution():
    gen = torch.Generator().manual_seed(5)
    params = [
        SamplingParams(temperature=0, logprobs=3, presence_penalty=1.0),
        SamplingParams(temperature=0.7, top_k=5, logprobs=4, seed=1),
        SamplingParams(temperature=1.0, seed=2),
        SamplingParams(temperature=1.2, logit_bias={4: 3.0}, logprobs=0, seed=3),
        SamplingParams(temperature=0.9, top_k=8, top_p=0.7, logprobs=2, seed=4),
    ]
    for batch in (params, params + [SamplingParams(temperature=0.8, top_p=0.6, logprobs=1, seed=5)]):
        check_logprobs(batch, 2 * torch.randn(len(batch), VOCAB, generator=gen))


def check_logprobs(params: list[SamplingParams], logits: torch.Tensor) -> None:
    """The logprobs that ``sample`` gives each row against the float64 reference (row 2 asks for none)."""
    n = len(params)
    sampler = sampler_for(params, [([0], [1, 1, 2])] * n)
    processed = sampler.process(logits, torch.arange(n), list(range(n)))
    sampler = sampler_for(params, [([0], [1, 1, 2])] * n)
    tokens, logprobs = sampler.sample(logits, torch.arange(n), list(range(n)))
    assert logprobs[2] is None
    for row in (0, 1, *range(3, n)):
        p = params[row]
        dist = processed[row].double()
        if p.temperature:
            dist = dist / p.temperature
            kept = reference_kept(processed[row], p)
            dist = torch.tensor(
                [v if i in kept else -math.inf for i, v in enumerate(dist.tolist())], dtype=torch.float64
            )
        ref = dist.log_softmax(-1)
        entries = logprobs[row]
        assert entries[0][0] == tokens[row].item()
        assert len(entries) == 1 + p.logprobs
        for token, value in entries:
            assert abs(value - ref[token].item()) < 1e-4
        top = [v for _, v in entries[1:]]
        assert top == sorted(top, reverse=True)
        assert [t for t, _ in entries[1:]] == ref.topk(p.logprobs).indices.tolist()


def test_a_request_that_masks_every_token_still_gets_one_in_the_vocabulary():
    """allowed_token_ids whose only token min_tokens forbids (it is a stop token) leave no token: the sampler
    gives token 0 under any sampling, rather than an id past the vocabulary that would fail the step."""
    params = [
        SamplingParams(temperature=t, top_p=p, allowed_token_ids=[7], stop_token_ids=[7], min_tokens=2, seed=1)
        for t, p in ((1.0, 1.0), (0.8, 0.5), (0.0, 1.0))
    ]
    sampler = sampler_for(params)
    tokens = sampler(torch.randn(3, VOCAB), torch.arange(3), [0, 1, 2])
    assert tokens.tolist() == [0, 0, 0]
