"""The LoRA shrink and expand: their torch references against a per-row loop, and the Triton kernels against
the references (without a GPU, in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.lora import SHORT, SPLIT_K, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
SLOTS = 3
CASES = [  # each token row's adapter slot (-1: none), R, K (shrink's inner dim), N (expand's outputs)
    ([0, -1, 2, 0], 48, 96, 80),
    ([2] * 17 + [1] * 3 + [-1] * 40, 16, 600, 24),
    ([-1] * 5 + [1] * 33 + [0, 2, 1], 24, 40, 130),
    ([0] * 70 + [-1] * 3 + [2] * 9, 32, 300, 72),
]


def case(dtype: torch.dtype, row_slots: list[int], r: int, k: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = len(row_slots)
    x = torch.randn(t, k, generator=gen).to(dtype)
    a = (torch.randn(SLOTS, r, k, generator=gen) / k**0.5).to(dtype)
    b = (torch.randn(SLOTS, n, r, generator=gen) / r**0.5).to(dtype)
    y = torch.randn(t, n, generator=gen).to(dtype)
    groups = [[row for row, s in enumerate(row_slots) if s == slot] for slot in range(SLOTS)]
    rows = torch.tensor([row for g in groups for row in g], dtype=torch.int32)
    indptr = torch.tensor([0] + [len(g) for g in groups]).cumsum(0).int()
    return x, a, b, y, rows, indptr


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_references_match_a_row_by_row_loop() -> None:
    row_slots = [1, 1, -1, 0, 2, 1, -1, 0]
    x, a, b, y, rows, indptr = case(torch.float32, row_slots, 8, 40, 24)
    expected = y.clone().double()
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            expected[row] += b[slot].double() @ (a[slot].double() @ x[row].double())
    got = lora_expand_ref(lora_shrink_ref(x, a, rows, indptr), b, rows, indptr, y.clone())
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("row_slots,r,k,n", CASES)
def test_triton_shrink_and_expand_match_references(dtype, row_slots, r, k, n) -> None:
    x, a, b, y, rows, indptr = (t.to(DEVICE) for t in case(dtype, row_slots, r, k, n))
    listed = len(rows)
    max_rows = int(indptr.diff().max())
    parts = lora_shrink(x, a, rows, indptr, max_rows)
    assert parts.shape[0] == (-(-k // SPLIT_K) if max_rows <= SHORT else 1)
    assert rel_err(parts.sum(0)[:listed], lora_shrink_ref(x, a, rows, indptr)[0][:listed]) < TOL[dtype]
    got = lora_expand(parts, b, rows, indptr, y.clone(), max_rows)
    expected = lora_expand_ref(parts, b, rows, indptr, y.clone())
    without = torch.tensor([s < 0 for s in row_slots], device=DEVICE)
    assert torch.equal(got[without], y[without]), "rows without an adapter must be left as they were"
    assert rel_err(got - y, expected - y) < TOL[dtype]
