"""The LoRA segmented matmul: its torch reference against a per-row loop, and the Triton kernel against the
reference (without a GPU, in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.lora import segment_matmul, segment_matmul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def case(dtype: torch.dtype, lengths: list[int], slots: list[int], n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    x = torch.randn(t, k, generator=gen).to(dtype)
    w = torch.randn(3, n, k, generator=gen).to(dtype) / k**0.5
    out = torch.randn(t, n, generator=gen).to(dtype)
    indptr = torch.tensor([0] + lengths).cumsum(0).int()
    return x, w, indptr, torch.tensor(slots, dtype=torch.int32), out


def naive(x, w, indptr, slots, out, accumulate):
    out = out.clone().double()
    for b, slot in enumerate(slots.tolist()):
        for row in range(indptr[b], indptr[b + 1]):
            if slot >= 0:
                prod = x[row].double() @ w[slot].double().T
                out[row] = out[row] + prod if accumulate else prod
    return out


@pytest.mark.parametrize("accumulate", [False, True])
def test_reference_matches_a_row_by_row_loop(accumulate: bool) -> None:
    x, w, indptr, slots, out = case(torch.float32, [3, 1, 5, 2], [1, -1, 0, 1], n=24, k=40)
    expected = naive(x, w, indptr, slots, out, accumulate)
    got = segment_matmul_ref(x, w, indptr, slots, out.clone(), accumulate)
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("lengths,slots,n,k", [
    ([1, 1, 1, 1], [0, -1, 2, 0], 48, 96),
    ([17, 3, 40], [2, 1, -1], 16, 200),
    ([5, 33], [-1, 1], 100, 24),
])
def test_triton_matches_reference(dtype, accumulate, lengths, slots, n, k) -> None:
    x, w, indptr, s, out = (t.to(DEVICE) for t in case(dtype, lengths, slots, n, k))
    expected = segment_matmul_ref(x, w, indptr, s, out.clone(), accumulate)
    got = segment_matmul(x, w, indptr, s, out.clone(), accumulate, max(lengths))
    skipped = torch.repeat_interleave(s.long(), indptr.diff().long()) < 0
    assert torch.equal(got[skipped], out[skipped]), "rows without an adapter must be left as they were"
    err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < TOL[dtype]
