"""W4A16 matmul: 4-bit weights with a scale and zero point per group of inputs, 16-bit (or fp32) activations.

The canonical layout, for a linear layer whose weight W is logically [N, K] (N outputs, K inputs) and whose
inputs are quantized in groups of G (``K % 8 == 0``, ``K % G == 0``; G == K is one group):

- ``qweight`` int32 [K // 8, N]: word ``qweight[r, n]`` holds the unsigned 4-bit values of inputs
  ``k = 8 * r + j``, j = 0..7, at bits ``4 * j .. 4 * j + 3`` (GPTQ's own packing, along K).
- ``scales`` and ``zeros`` [K // G, N], in the activation dtype; zeros are float zero points.
- ``W^T[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]``, and ``y = x @ W^T``.

:func:`awq_to_canonical` and :func:`gptq_to_canonical` convert AutoAWQ (GEMM) and GPTQ checkpoints.

One Triton kernel computes tiles of ``y^T = W @ x^T``, so that the dequantized weight tile [BLOCK_N, BLOCK_K]
is the dot's first operand. It unpacks each word's 8 nibbles into one thread by interleaving, turns a nibble
q into the fp32 16 + q by moving it into the mantissa of 16.0 (no int-to-float conversion), and subtracts
16 + z, which is exact for integer zero points. When BLOCK_K divides G (or G == K) a K-step lies in one
group and reads one row of scales and zeros; with few rows of x the scale then multiplies the
[BLOCK_N, BLOCK_M] product instead of every weight. :func:`choose_config` picks the tiles by M:

- decode (M <= 16): one 16-row tile covers all of x, so each packed weight is read once, and K is split
  over several programs per SM to keep enough loads in flight (memory bound: 0.5 bytes per weight).
- prefill (larger M): larger tiles (grouped along M for L2 reuse), K split only while the tiles are fewer
  than the SMs.

With K split, each split writes fp32 partial sums and a second kernel adds them up in a fixed order
(deterministic) and casts them to x's dtype. Configs depend only on shapes (no autotuning, no host syncs),
so calls can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AutoAWQ word holds column 8 * c + AWQ_ORDER[i]
_SHIFTS = tuple(range(0, 32, 4))
# Tiles by M: (largest M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM to aim for when
# splitting K). Decode (M <= 16) splits K over several programs per SM to keep enough loads in flight.
_CONFIGS = (
    (16, 16, 64, 128, 4, 4, 4),
    (32, 32, 64, 128, 4, 4, 3),
    (64, 64, 64, 128, 4, 3, 2),
    (1024, 128, 64, 64, 4, 3, 1),
    (None, 256, 64, 64, 4, 3, 1),
)
_GROUP_M = 8
_BITS_OF_16 = 0x41800000  # 16.0 as fp32 bits


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers 0..15 [K, N] -> qweight int32 [K // 8, N], input 8 * r + j at bits 4 * j of row r."""
    k, n = q.shape
    if k % 8:
        raise ValueError(f"K = {k} must be a multiple of 8")
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError("4-bit values must lie in 0..15")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    words = (q.to(torch.int64).reshape(k // 8, 8, n) << shifts[None, :, None]).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K // 8, N] -> the values 0..15 [K, N] as int32."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=qweight.device)
    return ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])


def unpack_columns(packed: torch.Tensor, awq: bool) -> torch.Tensor:
    """int32 [R, C] packed along columns -> int32 [R, 8 * C] of 0..15: nibble i of word c holds column
    ``8 * c + AWQ_ORDER[i]`` (AutoAWQ) or ``8 * c + i`` (GPTQ's qzeros)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    nibbles = (packed[:, :, None] >> shifts) & 0xF
    if awq:
        nibbles = nibbles[:, :, [AWQ_ORDER.index(column) for column in range(8)]]
    return nibbles.reshape(packed.shape[0], -1)


def awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's qweight [K, N // 8] (packed along N) -> the canonical qweight [K // 8, N]."""
    return pack_int4(unpack_columns(qweight, awq=True))


def awq_to_canonical(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM tensors (qweight [K, N // 8], qzeros [K // G, N // 8], both packed along N in
    :data:`AWQ_ORDER`; scales [K // G, N]) -> canonical ``(qweight, scales, zeros)``."""
    n = scales.shape[1]
    zeros = unpack_columns(qzeros, awq=True)[:, :n].to(scales.dtype)
    return pack_int4(unpack_columns(qweight, awq=True)[:, :n]), scales.contiguous(), zeros


def gptq_to_canonical(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, zero_offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors (qweight [K // 8, N], already canonical; qzeros [K // G, N // 8] packed along N in order;
    scales [K // G, N]) -> canonical ``(qweight, scales, zeros)``. The real zero is the stored one plus
    ``zero_offset``: 1 for ``checkpoint_format`` "gptq" (v1, which stores zero - 1), 0 for "gptq_v2"."""
    zeros = unpack_columns(qzeros, awq=False)[:, : scales.shape[1]] + zero_offset
    return qweight.contiguous(), scales.contiguous(), zeros.to(scales.dtype)


def quantize(wt: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit of W^T [K, N] by groups of ``group_size`` inputs -> canonical
    ``(qweight, scales, zeros)``, scales and zeros in ``wt``'s dtype."""
    k, n = wt.shape
    groups = wt.float().reshape(k // group_size, group_size, n)
    low, high = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-8).to(wt.dtype)
    zeros = (-low / scales.float()).round().clamp(0, 15)
    q = (groups / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(k, n)
    return pack_int4(q.to(torch.int32)), scales, zeros.to(wt.dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Canonical tensors -> W^T [K, N] in fp32."""
    q = unpack_int4(qweight).float()
    s = scales.float().repeat_interleave(group_size, 0)
    z = zeros.float().repeat_interleave(group_size, 0)
    return (q - z) * s


def w4a16_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] @ dequantized W^T [K, N] in fp32 -> y [M, N] in x's dtype."""
    return (x.float() @ dequantize_int4(qweight, scales, zeros, group_size)).to(x.dtype)


class Int4Config(NamedTuple):
    """How :func:`w4a16_matmul` tiles a problem: K is cut into ``splits`` chunks of ``chunk`` inputs."""

    block_m: int
    block_n: int
    block_k: int
    splits: int
    chunk: int
    one_group: bool  # every [BLOCK_K] run of inputs lies in one group
    scale_after_dot: bool
    num_warps: int
    num_stages: int


def _split_count(steps: int, wanted: int) -> int:
    """The number of chunks to cut ``steps`` K-steps into: ``wanted``, or the largest divisor of ``steps`` not
    above it when that is at least half as many (equal chunks need no masks along K)."""
    wanted = max(1, min(wanted, steps))
    divisor = max(d for d in range(1, wanted + 1) if steps % d == 0)
    return divisor if 2 * divisor >= wanted else wanted


def choose_config(m: int, n: int, k: int, group_size: int, num_sms: int) -> Int4Config:
    """The tiles for x [m, k] times W^T [k, n] on a GPU of ``num_sms`` SMs, by M; K is split while the tiles
    are too few to give each SM its share of programs (at most one wave of them)."""
    _, block_m, block_n, block_k, num_warps, num_stages, per_sm = next(c for c in _CONFIGS if c[0] is None or m <= c[0])
    # A tile within one group reads one row of scales: BLOCK_K must divide G (unless G is all of K).
    one_group = group_size == k or (group_size & -group_size) >= 16
    if group_size != k and one_group:
        block_k = min(block_k, group_size & -group_size)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    chunk = triton.cdiv(steps, _split_count(steps, per_sm * num_sms // tiles)) * block_k
    # Scaling the [BLOCK_N, BLOCK_M] product instead of the [BLOCK_N, BLOCK_K] weights is cheaper for few rows.
    scale_after_dot = one_group and block_m < block_k
    return Int4Config(
        block_m, block_n, block_k, triton.cdiv(k, chunk), chunk, one_group, scale_after_dot, num_warps, num_stages
    )


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # Triton's interpreter: tile as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _biased_nibble(words, bits_of_16, J: tl.constexpr):
    """16 + nibble J of each word as fp32, by moving the nibble into the mantissa (bits 19..22) of 16.0."""
    shifted = words << (19 - 4 * J) if 4 * J <= 19 else words >> (4 * J - 19)
    return ((shifted & 0x780000) | bits_of_16).to(tl.float32, bitcast=True)


@triton.jit
def _unpack_tile(qw_ptr, packed_rows, row_mask, cols, col_mask, qw_stride, bits_of_16):
    """16 + q for the inputs of ``packed_rows`` and outputs ``cols``: fp32 [BLOCK_N, 8 * len(packed_rows)]."""
    words = tl.load(
        qw_ptr + packed_rows[None, :] * qw_stride + cols[:, None], mask=row_mask[None, :] & col_mask[:, None], other=0
    )
    # Three rounds of interleaving put nibble j of word r at column 8 * r + j, each word's 8 in one thread.
    return tl.interleave(
        tl.interleave(
            tl.interleave(_biased_nibble(words, bits_of_16, 0), _biased_nibble(words, bits_of_16, 4)),
            tl.interleave(_biased_nibble(words, bits_of_16, 2), _biased_nibble(words, bits_of_16, 6)),
        ),
        tl.interleave(
            tl.interleave(_biased_nibble(words, bits_of_16, 1), _biased_nibble(words, bits_of_16, 5)),
            tl.interleave(_biased_nibble(words, bits_of_16, 3), _biased_nibble(words, bits_of_16, 7)),
        ),
    )


@triton.jit
def _group_params(
    s_ptr, z_ptr, k0, cols, col_mask, s_stride, z_stride, K: tl.constexpr, G: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Scales and zeros (fp32) of inputs ``k0 + [0, BLOCK_K)`` and outputs ``cols``: [BLOCK_N, 1] when the inputs
    lie in one group (``ONE_GROUP``), else [BLOCK_N, BLOCK_K]. Inputs past K read the last group's."""
    if ONE_GROUP:
        groups = tl.minimum(k0 // G, K // G - 1)
    else:
        groups = tl.minimum((k0 + tl.arange(0, BLOCK_K)) // G, K // G - 1)[None, :]
    s = tl.load(s_ptr + groups * s_stride + cols[:, None], mask=col_mask[:, None], other=0.0)
    z = tl.load(z_ptr + groups * z_stride + cols[:, None], mask=col_mask[:, None], other=0.0)
    return s.to(tl.float32), z.to(tl.float32)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bits_of_16, M, N, x_stride_m, x_stride_k, qw_stride, s_stride, z_stride,
    out_stride_split, out_stride_m, K: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, ONE_GROUP: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Program (t, s) writes tile t of ``x @ W^T`` over inputs ``[s * CHUNK, (s + 1) * CHUNK)`` to split s of out,
    computing its transpose ``W @ x^T`` so that the dequantized weights are the dot's first operand."""
    tile, split = tl.program_id(0), tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    first_m = tile // (GROUP_M * n_blocks) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    tile_m = first_m + tile % (GROUP_M * n_blocks) % group_rows
    tile_n = tile % (GROUP_M * n_blocks) // group_rows
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, (cols < N) | EVEN_N
    x_rows = x_ptr + rows[None, :].to(tl.int64) * x_stride_m
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK_K):
        k0 = split * CHUNK + step
        k, packed_rows = k0 + tl.arange(0, BLOCK_K), k0 // 8 + tl.arange(0, BLOCK_K // 8)
        k_mask, packed_mask = (k < K) | EVEN_K, (packed_rows < K // 8) | EVEN_K
        xt = tl.load(x_rows + k[:, None] * x_stride_k, mask=row_mask[None, :] & k_mask[:, None], other=0.0)
        s, z = _group_params(s_ptr, z_ptr, k0, cols, col_mask, s_stride, z_stride, K, G, ONE_GROUP, BLOCK_K)
        # (16 + q) - (16 + z) is exact for integer z; other zeros are rounded to fp32 next to 16 (2**-19 apart).
        q_minus_z = _unpack_tile(qw_ptr, packed_rows, packed_mask, cols, col_mask, qw_stride, bits_of_16) - (z + 16.0)
        if SCALE_AFTER_DOT:  # one group: scale the [BLOCK_N, BLOCK_M] product instead of the weights
            acc += tl.dot(q_minus_z.to(xt.dtype), xt, input_precision=PRECISION) * s
        else:
            acc = tl.dot((q_minus_z * s).to(xt.dtype), xt, acc, input_precision=PRECISION)
    out = out_ptr + split * out_stride_split + rows[None, :].to(tl.int64) * out_stride_m + cols[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[None, :] & col_mask[:, None])


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, bits_of_16, N, x_stride, qw_stride, s_stride, z_stride, out_stride_split,
    G: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (t, s): outputs ``[t * BLOCK_N, (t + 1) * BLOCK_N)`` of one row x over inputs
    ``[s * CHUNK, (s + 1) * CHUNK)``, each K-step inside one group. The [BLOCK_K / 8, BLOCK_N] products stay
    apart across steps and are summed once at the end; a step's zero point comes off as (16 + z) times the sum
    of its inputs, and its scale multiplies the step's sums."""
    tile, split = tl.program_id(0), tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    r = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK_K):
        k0 = split * CHUNK + step
        words = tl.load(qw_ptr + (k0 // 8 + r)[:, None] * qw_stride + cols[None, :], mask=col_mask[None, :], other=0)
        s = tl.load(s_ptr + k0 // G * s_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + k0 // G * z_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        sums = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        x_sums = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        for j in tl.static_range(8):
            x = tl.load(x_ptr + (k0 + 8 * r + j) * x_stride).to(tl.float32)
            sums += _biased_nibble(words, bits_of_16, j) * x[:, None]
            x_sums += x
        acc += (sums - (z + 16.0)[None, :] * x_sums[:, None]) * s[None, :]
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + split * out_stride_split + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


class GemvConfig(NamedTuple):
    """How :func:`int4_gemv` tiles one row: outputs per program, and K split until there are about
    ``programs_per_sm`` programs per SM."""

    block_n: int = 128
    programs_per_sm: int = 4
    num_warps: int = 4
    num_stages: int = 4


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """One row x [1, K] (:func:`w4a16_matmul` takes this path): each packed word read once, K split over
    programs until the GPU is full. The group size must have a power-of-two factor of at least 16."""
    cfg = config or GemvConfig()
    k, n = x.shape[1], qweight.shape[1]
    block = min(128, group_size & -group_size)
    if block < 16:
        raise ValueError(f"the one-row kernel needs groups of a multiple of 16 inputs, not {group_size}")
    tiles, steps = triton.cdiv(n, cfg.block_n), k // block
    wanted = max(1, min(steps, cfg.programs_per_sm * _num_sms(x.device) // tiles))
    splits = max(d for d in range(1, wanted + 1) if steps % d == 0)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    out = y if splits == 1 else torch.empty(splits, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(tiles, splits)](
        x, qweight, scales, zeros, out, _BITS_OF_16, n, x.stride(1), qweight.stride(0), scales.stride(0),
        zeros.stride(0), out.stride(0) if splits > 1 else 0, G=group_size, CHUNK=k // splits, BLOCK_N=cfg.block_n,
        BLOCK_K=block, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(n, 1024),)](out, y, n, SPLITS=splits, BLOCK=1024, num_warps=4)
    return y


@triton.jit
def _sum_splits_kernel(parts_ptr, y_ptr, size, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """y (flat, ``size`` entries) = the sum over splits of parts [splits, size], in split order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        acc += tl.load(parts_ptr + split * size + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    if x.dim() != 2 or qweight.dim() != 2:
        raise ValueError("x must be [M, K] and qweight [K // 8, N]")
    k, n = x.shape[1], qweight.shape[1]
    if group_size <= 0 or k % 8 or k % group_size:
        raise ValueError(f"K = {k} must be a multiple of 8 and of the group size {group_size}")
    if qweight.dtype != torch.int32 or qweight.shape != (k // 8, n):
        raise ValueError(f"qweight must be int32 [{k // 8}, {n}], not {qweight.dtype} {list(qweight.shape)}")
    if scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise ValueError(f"scales and zeros must be [{k // group_size}, {n}]")
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        raise ValueError("qweight, scales and zeros need a unit stride along N")


def w4a16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Triton :func:`w4a16_matmul_ref`: x [M, K] (any strides) -> y [M, N] in x's dtype."""
    _check(x, qweight, scales, zeros, group_size)
    (m, k), n = x.shape, qweight.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if m == 1 and (group_size & -group_size) >= 16:
        return int4_gemv(x, qweight, scales, zeros, group_size)
    cfg = choose_config(m, n, k, group_size, _num_sms(x.device))
    split = cfg.splits > 1
    out = torch.empty(cfg.splits, m, n, dtype=torch.float32, device=x.device) if split else y[None]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.splits)
    # The bits of 16.0f go in as a run-time value so that the compiler keeps them in a register and fuses
    # each nibble's mask and or into one instruction.
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, out, _BITS_OF_16, m, n, x.stride(0), x.stride(1), qweight.stride(0),
        scales.stride(0), zeros.stride(0), out.stride(0), out.stride(1), K=k, G=group_size, CHUNK=cfg.chunk,
        EVEN_K=k % cfg.chunk == 0, EVEN_N=n % cfg.block_n == 0, ONE_GROUP=cfg.one_group,
        SCALE_AFTER_DOT=cfg.scale_after_dot, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=_GROUP_M, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, SPLITS=cfg.splits, BLOCK=block, num_warps=4)
    return y
