"""The Triton Gumbel-max sampling kernel against its torch reference.

Without a GPU the kernel runs in Triton's interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.sampling import gumbel_argmax, gumbel_argmax_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("vocab", [7, 4096, 5000, 49152])
def test_kernel_draws_the_reference_tokens(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 6
    scaled = torch.randn(rows, vocab, generator=g) * 3
    scaled[1, torch.randperm(vocab, generator=g)[: vocab // 2]] = float("-inf")  # a filtered row
    scaled[2] = float("-inf")
    scaled[2, vocab - 1] = 0.0  # only the last token is allowed
    seeds = torch.randint(0, 2**32, (rows,), generator=g)
    counters = torch.randint(0, 1000, (rows,), generator=g)
    for step in range(3):
        ref = gumbel_argmax_ref(scaled, seeds, counters + step)
        out = gumbel_argmax(scaled.to(DEVICE), seeds.to(DEVICE), (counters + step).to(DEVICE)).cpu()
        assert torch.equal(out, ref)
        assert out[2] == vocab - 1 and torch.isfinite(scaled[1, out[1]])


def test_kernel_samples_depend_on_seed_and_counter_only():
    scaled = torch.zeros(4, 300)
    seeds, counters = torch.tensor([1, 2, 1, 1]), torch.tensor([5, 5, 5, 6])
    out = gumbel_argmax(scaled.to(DEVICE), seeds.to(DEVICE), counters.to(DEVICE)).cpu()
    alone = gumbel_argmax(scaled[:1].to(DEVICE), seeds[:1].to(DEVICE), counters[:1].to(DEVICE)).cpu()
    assert out[0] == out[2] == alone[0]
    assert len(set(out.tolist())) > 1


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="fp32"):
        gumbel_argmax(
            torch.zeros(2, 8, dtype=torch.float16, device=DEVICE),
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64),
        )
