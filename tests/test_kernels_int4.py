"""4-bit weights: packing, the AutoAWQ and GPTQ checkpoint layouts against loop-built checkpoints, the torch
reference against a dequantize-then-matmul written here, and the Triton kernel against the reference (without
a GPU, in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.int4 import (
    awq_qweight,
    awq_to_canonical,
    choose_config,
    dequantize_int4,
    gptq_to_canonical,
    pack_int4,
    quantize,
    unpack_int4,
    w4a16_matmul,
    w4a16_matmul_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of word c holds column 8c + AWQ_ORDER[i]
CASES = [  # M, N, K, group size, x a view with a row stride (one row: the GEMV, but for group 24)
    (1, 72, 128, 32, False),
    (1, 200, 256, 64, True),
    (1, 130, 384, 384, False),
    (1, 72, 192, 24, False),
    (3, 200, 256, 64, True),
    (16, 72, 384, 384, False),
    (16, 128, 256, 64, False),
    (40, 200, 256, 32, True),
    (40, 128, 384, 384, False),
    (3, 72, 192, 24, False),
    (130, 72, 128, 32, True),
    (1100, 72, 64, 32, False),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def to_int32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def pack_words(values: torch.Tensor, nibble_to_column: list[int]) -> torch.Tensor:
    """[rows, cols] of 0..15 -> int32 [rows, cols / 8], nibble i of word c holding column 8c + nibble_to_column[i]."""
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for c in range(cols // 8):
            word = sum(int(values[r, 8 * c + nibble_to_column[i]]) << (4 * i) for i in range(8))
            out[r, c] = to_int32(word)
    return out


def random_group_quant(k: int, n: int, group: int, seed: int = 0):
    """q [K, N] in 0..15, integer zeros and fp16 scales [K / group, N], and W^T = (q - z) * s in fp64."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    w = (q - zeros.repeat_interleave(group, 0)).double() * scales.double().repeat_interleave(group, 0)
    return q, zeros, scales, w


def test_pack_puts_input_8r_plus_j_at_bits_4j_of_row_r() -> None:
    q = torch.tensor([[j % 16 for _ in range(3)] for j in range(16)]) * torch.tensor([1, 1, 0])
    q[8:, 1] = 15 - q[8:, 1]
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (2, 3)
    assert packed[0, 0] == 0x76543210 and packed[1, 0] == to_int32(0xFEDCBA98)
    assert packed[1, 1] == 0x01234567 and packed[0, 2] == 0
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (64, 40), generator=gen)
    assert torch.equal(unpack_int4(pack_int4(values)), values.int())


def test_pack_rejects_bad_values_and_lengths() -> None:
    with pytest.raises(ValueError):
        pack_int4(torch.full((8, 2), 16))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(12, 2, dtype=torch.int32))


@pytest.mark.parametrize("group", [32, 64])
def test_awq_checkpoint_converts_to_the_same_weights(group: int) -> None:
    k, n = 128, 48
    q, zeros, scales, w = random_group_quant(k, n, group)
    qweight, qzeros = pack_words(q, AWQ_ORDER), pack_words(zeros, AWQ_ORDER)
    canonical = awq_to_canonical(qweight, qzeros, scales)
    assert canonical[0].shape == (k // 8, n) and canonical[2].dtype == scales.dtype
    assert torch.equal(dequantize_int4(*canonical, group).double(), w.float().double())
    assert torch.equal(awq_qweight(qweight), canonical[0])


@pytest.mark.parametrize("zero_offset", [1, 0])
def test_gptq_checkpoint_converts_to_the_same_weights(zero_offset: int) -> None:
    k, n, group = 128, 48, 32
    q, zeros, scales, w = random_group_quant(k, n, group, seed=1)
    zeros = zeros.clamp(min=zero_offset)  # a v1 checkpoint cannot store a zero point of 0
    w = (q - zeros.repeat_interleave(group, 0)).double() * scales.double().repeat_interleave(group, 0)
    qweight = pack_words(q.T.contiguous(), list(range(8))).T.contiguous()  # along K, nibble j is input 8r + j
    qzeros = pack_words(zeros - zero_offset, list(range(8)))
    canonical = gptq_to_canonical(qweight, qzeros, scales, zero_offset)
    assert torch.equal(canonical[0], pack_int4(q))
    assert torch.equal(dequantize_int4(*canonical, group).double(), w.float().double())


def test_symmetric_gptq_stores_seven_for_a_zero_point_of_eight() -> None:
    qzeros = torch.full((2, 3), 0x77777777, dtype=torch.int32)
    _, _, zeros = gptq_to_canonical(torch.zeros(4, 24, dtype=torch.int32), qzeros, torch.ones(2, 24).half(), 1)
    assert torch.equal(zeros, torch.full((2, 24), 8.0).half())


def test_quantize_rounds_to_the_nearest_level() -> None:
    w = torch.randn(256, 40, generator=torch.Generator().manual_seed(2))
    qweight, scales, zeros = quantize(w, 64)
    err = (dequantize_int4(qweight, scales, zeros, 64) - w).abs()
    assert (err <= scales.repeat_interleave(64, 0) / 2 + 1e-6).all()
    assert zeros.min() >= 0 and zeros.max() <= 15


def test_reference_matches_dequantize_then_matmul() -> None:
    k, n, group = 64, 24, 16
    q, zeros, scales, w = random_group_quant(k, n, group, seed=3)
    qweight = pack_int4(q)
    words = [[int(qweight[r, c]) & 0xFFFFFFFF for c in range(n)] for r in range(k // 8)]
    by_bits = torch.tensor(
        [[((words[i // 8][c] >> (4 * (i % 8))) & 0xF) - int(zeros[i // group, c]) for c in range(n)] for i in range(k)],
        dtype=torch.float64,
    ) * scales.double().repeat_interleave(group, 0)
    assert torch.equal(by_bits, w)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4))
    got = w4a16_matmul_ref(x, qweight, scales.float(), zeros.float(), group)
    assert rel_err(got, x.double() @ w) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,group,strided", CASES)
def test_triton_matches_reference(dtype: torch.dtype, m: int, n: int, k: int, group: int, strided: bool) -> None:
    q, zeros, scales, _ = random_group_quant(k, n, group, seed=m + n + k)
    qweight, scales, zeros = pack_int4(q).to(DEVICE), scales.to(DEVICE, dtype), zeros.to(DEVICE, dtype)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(m, k + 24 * strided, generator=gen).to(DEVICE, dtype)[:, :k]
    got = w4a16_matmul(x, qweight, scales, zeros, group)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, w4a16_matmul_ref(x, qweight, scales, zeros, group)) < TOL[dtype]


@pytest.mark.parametrize("m", [3, 40])
def test_triton_takes_fractional_zero_points(m: int) -> None:
    k, n, group = 256, 72, 64
    gen = torch.Generator().manual_seed(6)
    qweight = pack_int4(torch.randint(0, 16, (k, n), generator=gen)).to(DEVICE)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).to(DEVICE)
    zeros = (torch.rand(k // group, n, generator=gen) * 15).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    got = w4a16_matmul(x, qweight, scales, zeros, group)
    assert rel_err(got, w4a16_matmul_ref(x, qweight, scales, zeros, group)) < TOL[torch.float32]


def test_configs_split_k_for_decode_and_not_for_large_prefill() -> None:
    decode = choose_config(1, 4096, 4096, 128, 132)
    assert decode.splits > 1 and decode.block_m == 16 and decode.scale_after_dot
    assert decode.splits * decode.chunk == 4096 and 128 % decode.block_k == 0
    prefill = choose_config(2048, 4096, 4096, 128, 132)
    assert prefill.splits == 1 and prefill.chunk >= 4096 and not prefill.scale_after_dot
    assert choose_config(3, 72, 192, 24, 132).one_group is False
    assert choose_config(1, 72, 256, 32, 132).block_k == 32


def test_empty_batch_and_bad_shapes() -> None:
    qweight = torch.zeros(16, 8, dtype=torch.int32, device=DEVICE)
    scales = torch.ones(2, 8, device=DEVICE)
    assert w4a16_matmul(torch.zeros(0, 128, device=DEVICE), qweight, scales, scales, 64).shape == (0, 8)
    with pytest.raises(ValueError):
        w4a16_matmul(torch.zeros(2, 120, device=DEVICE), qweight, scales, scales, 64)
    with pytest.raises(ValueError):
        w4a16_matmul(torch.zeros(2, 128, device=DEVICE), qweight, scales[:1], scales[:1], 64)
