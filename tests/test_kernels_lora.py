"""The LoRA shrink and expand: their torch references against a per-row loop, and the Triton kernels against
the references (without a GPU, in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CASES = [  # segment lengths, their slots, R, K (shrink's inner dim), N (expand's outputs)
    ([1, 1, 1, 1], [0, -1, 2, 0], 48, 96, 80),
    ([17, 3, 40], [2, 1, -1], 16, 600, 24),
    ([5, 33], [-1, 1], 24, 40, 130),
]


def case(dtype: torch.dtype, lengths: list[int], slots: list[int], r: int, k: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    x = torch.randn(t, k, generator=gen).to(dtype)
    a = (torch.randn(3, r, k, generator=gen) / k**0.5).to(dtype)
    b = (torch.randn(3, n, r, generator=gen) / r**0.5).to(dtype)
    y = torch.randn(t, n, generator=gen).to(dtype)
    indptr = torch.tensor([0] + lengths).cumsum(0).int()
    return x, a, b, y, indptr, torch.tensor(slots, dtype=torch.int32)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_references_match_a_row_by_row_loop() -> None:
    x, a, b, y, indptr, slots = case(torch.float32, [3, 1, 5, 2], [1, -1, 0, 1], 8, 40, 24)
    expected = y.clone().double()
    for seg, slot in enumerate(slots.tolist()):
        for row in range(indptr[seg], indptr[seg + 1]):
            if slot >= 0:
                expected[row] += b[slot].double() @ (a[slot].double() @ x[row].double())
    parts = lora_shrink_ref(x, a, indptr, slots)
    got = lora_expand_ref(parts, b, indptr, slots, y.clone())
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths,slots,r,k,n", CASES)
def test_triton_shrink_and_expand_match_references(dtype, lengths, slots, r, k, n) -> None:
    x, a, b, y, indptr, s = (t.to(DEVICE) for t in case(dtype, lengths, slots, r, k, n))
    with_adapter = torch.repeat_interleave(s.long(), indptr.diff().long()) >= 0
    parts = lora_shrink(x, a, indptr, s, max(lengths))
    expected_parts = lora_shrink_ref(x, a, indptr, s)
    assert parts.shape[0] == -(-k // 256)
    assert rel_err(parts.sum(0)[with_adapter], expected_parts[0][with_adapter]) < TOL[dtype]
    got = lora_expand(parts, b, indptr, s, y.clone(), max(lengths))
    expected = lora_expand_ref(parts, b, indptr, s, y.clone())
    assert torch.equal(got[~with_adapter], y[~with_adapter]), "rows without an adapter must be left as they were"
    assert rel_err(got - y, expected - y) < TOL[dtype]
