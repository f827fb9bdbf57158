"""The Triton sampling kernels (fused logit processors, nucleus rejection sampling) against their torch
references.

Without a GPU the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.sampling import (
    BIASED,
    FLOATS,
    INTS,
    PENALIZED,
    nucleus_sample,
    nucleus_sample_ref,
    process_logits,
    process_logits_ref,
    uniform_noise,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables(rows: list[dict], slots: int, vocab: int, g: torch.Generator):
    """The per-slot float and int tables with ``rows[i]``'s values (defaults elsewhere) in slot i, and random
    bias rows, output counts and seen tokens."""
    defaults = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "presence": 0.0, "frequency": 0.0, "repetition": 1.0}
    floats = torch.tensor(
        [[{**defaults, **r}[name] for name in FLOATS] for r in rows] + [list(defaults.values())] * (slots - len(rows))
    )
    ints = torch.zeros(slots, len(INTS), dtype=torch.int64)
    for i, r in enumerate(rows):
        ints[i] = torch.tensor([r.get(name, 0) for name in INTS])
    bias = torch.randn(slots, vocab, generator=g)
    bias[bias < -2] = float("-inf")
    counts = torch.randint(0, 3, (slots, vocab), generator=g, dtype=torch.int32)
    seen = torch.rand(slots, vocab, generator=g) < 0.3
    return floats, ints, bias, counts, seen


def on(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_processors_kernel_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    vocab = 3000
    rows = [
        {"flags": 0},
        {"flags": BIASED},
        {"flags": PENALIZED, "presence": 0.5, "frequency": 0.3, "repetition": 1.3},
        {"flags": BIASED | PENALIZED, "presence": -0.2, "frequency": 0.7, "repetition": 0.8},
    ]
    floats, ints, bias, counts, seen = tables(rows, 6, vocab, g)
    logits = (torch.randn(5, vocab, generator=g) * 4).to(dtype)
    slots = torch.tensor([3, 1, 0, 2, 3])
    ref = process_logits_ref(logits, slots, floats, ints, bias, counts, seen)
    out = process_logits(*on(DEVICE, logits, slots, floats, ints, bias, counts, seen)).cpu()
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.equal(ref[2], logits[2].float())  # a slot without flags is only converted
    assert torch.equal(ref[1], logits[1].float() + bias[1])
    assert not torch.equal(ref[3], logits[3].float())


def sampling_rows() -> list[dict]:
    return [
        {"temperature": 0.0, "seed": 1},
        {"temperature": 1.0, "seed": 2, "counter": 5},
        {"temperature": 0.7, "top_p": 0.9, "seed": 3, "counter": 1},
        {"temperature": 1.3, "top_k": 20, "top_p": 0.5, "seed": 4},
        {"temperature": 0.9, "min_p": 0.2, "seed": 5, "counter": 77},
        {"temperature": 1.0, "top_k": 1, "seed": 6},
        {"temperature": 2.0, "top_k": 40, "top_p": 0.8, "min_p": 0.05, "seed": 7, "counter": 3},
        {"temperature": 0.5, "top_p": 0.05, "seed": 8},
    ]


def kth_of(logits: torch.Tensor, ints: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    k = ints[slots, INTS.index("top_k")]
    values = logits.sort(dim=-1, descending=True).values
    return torch.where(k > 0, values.gather(1, (k.clamp(1, logits.shape[1]) - 1)[:, None])[:, 0], float("-inf"))


@pytest.mark.parametrize("vocab", [7, 5000, 49152])
def test_nucleus_kernel_draws_the_reference_tokens(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = sampling_rows()
    floats, ints, *_ = tables(rows, len(rows), vocab, g)
    slots = torch.arange(len(rows)).flip(0)
    for step in range(3):
        ints[:, INTS.index("counter")] += 1
        logits = torch.randn(len(rows), vocab, generator=g) * 3
        logits[1, torch.randperm(vocab, generator=g)[: vocab // 2]] = float("-inf")  # a masked row
        kth = kth_of(logits, ints, slots)
        ref = nucleus_sample_ref(logits, slots, floats, ints, kth)
        out = nucleus_sample(*on(DEVICE, logits, slots, floats, ints, kth)).cpu()
        assert torch.equal(out, ref), step
        assert out[slots.tolist().index(0)] == -1  # temperature 0 is left to the caller's argmax
        assert (out[slots != 0] >= 0).all()


def test_a_row_with_every_token_masked_draws_token_zero_in_both():
    """A request can mask every token (allowed_token_ids whose only token min_tokens forbids): its row is all -inf,
    and both the kernel and the reference give token 0, never an id past the vocabulary."""
    g = torch.Generator().manual_seed(2)
    vocab = 300
    rows = [{"temperature": 1.0, "seed": 1}, {"temperature": 0.7, "top_p": 0.5, "seed": 2},
            {"temperature": 1.0, "top_k": 5, "min_p": 0.1, "seed": 3}]  # fmt: skip
    floats, ints, *_ = tables(rows, 3, vocab, g)
    logits = torch.full((3, vocab), float("-inf"))
    slots = torch.arange(3)
    kth = kth_of(logits, ints, slots)
    ref = nucleus_sample_ref(logits, slots, floats, ints, kth)
    assert ref.tolist() == [0, 0, 0]
    assert torch.equal(nucleus_sample(*on(DEVICE, logits, slots, floats, ints, kth)).cpu(), ref)


def test_nucleus_without_top_p_is_one_gumbel_max_draw_over_the_top_k():
    g = torch.Generator().manual_seed(1)
    vocab = 500
    rows = [{"temperature": 0.8, "top_k": k, "seed": 11 + k, "counter": 3} for k in (0, 5, 50)]
    floats, ints, *_ = tables(rows, 3, vocab, g)
    logits = torch.randn(3, vocab, generator=g)
    slots = torch.arange(3)
    kth = kth_of(logits, ints, slots)
    scaled = logits / 0.8
    noise = uniform_noise(ints[:, INTS.index("seed")], ints[:, INTS.index("counter")], vocab)
    expected = torch.where(scaled >= (kth / 0.8)[:, None], scaled - torch.log(-torch.log(noise)), float("-inf"))
    assert torch.equal(nucleus_sample_ref(logits, slots, floats, ints, kth), expected.argmax(dim=-1))


def test_nucleus_draws_depend_on_seed_and_counter_only():
    vocab = 300
    rows = [{"seed": 1, "counter": 5, "top_p": 0.9}, {"seed": 2, "counter": 5, "top_p": 0.9}]
    rows += [{"seed": 1, "counter": 5, "top_p": 0.9}, {"seed": 1, "counter": 6, "top_p": 0.9}]
    floats, ints, *_ = tables(rows, 4, vocab, torch.Generator().manual_seed(2))
    logits = torch.zeros(4, vocab)
    out = nucleus_sample(*on(DEVICE, logits, torch.arange(4), floats, ints), None).cpu()
    alone = nucleus_sample(*on(DEVICE, logits[:1], torch.arange(1), floats, ints), None).cpu()
    assert out[0] == out[2] == alone[0]
    assert len(set(out.tolist())) > 1


def test_nucleus_frequencies_match_the_renormalized_nucleus():
    """top_p=0.7 over these probabilities keeps the first three tokens; draws follow their renormalized
    probabilities, which the first round's draw alone (over every token) would not."""
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.07])
    n = 20000
    rows = [{"top_p": 0.7, "seed": 9, "counter": i} for i in range(n)]
    floats, ints, *_ = tables(rows, n, 6, torch.Generator().manual_seed(3))
    tokens = nucleus_sample_ref(probs.log().expand(n, -1), torch.arange(n), floats, ints, None)
    freq = torch.bincount(tokens, minlength=6).double() / n
    expected = torch.tensor([0.35, 0.25, 0.15, 0, 0, 0], dtype=torch.float64) / 0.75
    assert (freq - expected).abs().max().item() < 0.015


def test_bad_input_is_rejected():
    floats, ints, *_ = tables([{}], 1, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="fp32"):
        nucleus_sample(
            *on(DEVICE, torch.zeros(1, 8, dtype=torch.float16), torch.zeros(1, dtype=torch.int64), floats, ints), None
        )
    with pytest.raises(ValueError, match="unit stride"):
        process_logits(
            torch.zeros(8, 2, device=DEVICE).t(),
            *on(DEVICE, torch.zeros(2, dtype=torch.int64), floats, ints, *tables([{}], 1, 8, torch.Generator())[2:]),
        )
