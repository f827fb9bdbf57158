"""FP8 (e4m3) W8A8 building blocks: activation quantization and the two scaled matmuls.

FP8 is ``torch.float8_e4m3fn`` (largest finite value ``FP8_MAX`` = 448). Scales are float32 and
multiply: ``real = fp8_value * scale``. Quantizing ``x`` with scale ``s`` stores
``clamp(x / s, -448, 448)`` cast to e4m3 (clamped first: the cast does not saturate). A dynamic
scale is ``max(amax, AMAX_FLOOR) / 448``: an all-zero row or group gets a tiny positive scale and
quantizes to zeros rather than dividing by zero.

- :func:`quant_fp8_per_token`: one dynamic scale per row, ``x [M, K] -> (q [M, K], scale [M, 1])``.
- :func:`quant_fp8_per_group`: one dynamic scale per row and group of ``group`` consecutive columns,
  ``x [M, K] -> (q [M, K], scale [M, K // group])``.
- :func:`quant_fp8_static`: one given scale for the whole tensor.
- :func:`fp8_block_matmul`: block-quantized weights (DeepSeek-V3 / Qwen3-FP8 checkpoints).
  ``w [N, K]`` is stored row-major as checkpoints hold it, with ``w_scale [ceil(N / block_n),
  ceil(K / block_k)]`` (their ``weight_scale_inv``): the real weight is
  ``w[n, k] * w_scale[n // block_n, k // block_k]``. The activations come from
  :func:`quant_fp8_per_group` with ``group == block_k``, so
  ``y[m, n] = sum_k xq[m, k] * x_scale[m, k // block_k] * w[n, k] * w_scale[n // block_n, k // block_k]``,
  accumulated in fp32.
- :func:`fp8_scaled_mm`: per-tensor or per-output-channel weight scales (``w_scale`` [N] or one
  element) with per-token or per-tensor activation scales (``x_scale`` [M, 1] or one element),
  through ``torch._scaled_mm`` on CUDA.

Each Triton function has a torch reference of the same signature, named with a ``_ref`` suffix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# The smallest amax a dynamic scale is computed from.
AMAX_FLOOR = 1e-12

_FP8_MAX = tl.constexpr(FP8_MAX)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


def _dynamic_scale_ref(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp(min=AMAX_FLOOR) / FP8_MAX


def _quantize_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quant_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` with one fp32 ``scale`` (0-dim or one element) for the whole tensor."""
    return _quantize_ref(x, scale.float().reshape(()))


def quant_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, 1] fp32), one dynamic scale per row."""
    scale = _dynamic_scale_ref(x.float().abs().amax(dim=1, keepdim=True))
    return _quantize_ref(x, scale), scale


def quant_fp8_per_group_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, K // group] fp32), one dynamic scale per row and column group."""
    m, k = x.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of group={group}")
    groups = x.float().reshape(m, k // group, group)
    scale = _dynamic_scale_ref(groups.abs().amax(dim=2))
    return _quantize_ref(groups, scale[:, :, None]).reshape(m, k), scale


@triton.jit
def _quant_per_token_kernel(x_ptr, q_ptr, scale_ptr, x_stride, q_stride, K: tl.constexpr, BLOCK: tl.constexpr):
    """Program i quantizes row i: one pass for its amax, a second to scale and cast."""
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * x_stride, q_ptr + row * q_stride
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0), _AMAX_FLOOR) / _FP8_MAX
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        q = tl.clamp(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32) / scale, -_FP8_MAX, _FP8_MAX)
        tl.store(q_row + k, q.to(q_ptr.dtype.element_ty), mask=k < K)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _quant_per_group_kernel(
    x_ptr, q_ptr, scale_ptr, x_stride, q_stride, scale_stride, GROUPS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Program (i, j) quantizes groups ``[j*GROUPS_PER_PROGRAM, (j+1)*GROUPS_PER_PROGRAM)`` of row i."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    c = tl.arange(0, BLOCK_GROUP)
    cols = g[:, None] * GROUP + c[None, :]
    mask = (g[:, None] < GROUPS) & (c[None, :] < GROUP)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), _AMAX_FLOOR) / _FP8_MAX
    q = tl.clamp(x / scale[:, None], -_FP8_MAX, _FP8_MAX)
    tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * scale_stride + g, scale, mask=g < GROUPS)


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with a unit stride in its last dim, got shape {tuple(x.shape)}")


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`quant_fp8_per_token_ref`."""
    _check_rows(x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(1024, triton.next_power_of_2(k))
        _quant_per_token_kernel[(m,)](x, q, scale, x.stride(0), q.stride(0), K=k, BLOCK=block, num_warps=4)
    return q, scale


def quant_fp8_per_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`quant_fp8_per_group_ref`."""
    _check_rows(x)
    m, k = x.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of group={group}")
    groups = k // group
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    block_group = triton.next_power_of_2(group)
    per_program = min(max(1, 1024 // block_group), triton.next_power_of_2(groups))
    if m:
        _quant_per_group_kernel[(m, triton.cdiv(groups, per_program))](
            x, q, scale, x.stride(0), q.stride(0), scale.stride(0), GROUPS=groups, GROUP=group,
            BLOCK_GROUP=block_group, GROUPS_PER_PROGRAM=per_program, num_warps=4,
        )  # fmt: skip
    return q, scale


def fp8_block_matmul_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_n: int,
    block_k: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``xq [M, K]`` (scales ``[M, K // block_k]``) times block-quantized ``w [N, K]``, dequantized to fp32."""
    n, k = w.shape
    x = xq.float() * x_scale.float().repeat_interleave(block_k, dim=1)[:, :k]
    w_scale_full = w_scale.float().repeat_interleave(block_n, dim=0).repeat_interleave(block_k, dim=1)
    return (x @ (w.float() * w_scale_full[:n, :k]).T).to(out_dtype)


class BlockMatmulConfig(NamedTuple):
    """Tiles of :func:`fp8_block_matmul`; ``splits`` > 1 splits K (fp32 partial sums, then a sum kernel)."""

    block_m: int
    block_n: int
    splits: int
    num_warps: int
    num_stages: int


# Decode-sized M splits K until there are about this many programs per SM, keeping at least this
# many K blocks per split.
SPLIT_PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_SPLIT = 4
GROUP_M = 8


def block_matmul_config(m: int, n: int, k_blocks: int, num_sms: int) -> BlockMatmulConfig:
    """The tile config for ``M = m``: decode-sized M gets short tiles and split-K, prefill 64 x 128 tiles."""
    if m > 256:
        return BlockMatmulConfig(block_m=64, block_n=128, splits=1, num_warps=4, num_stages=4)
    if m > 64:
        return BlockMatmulConfig(block_m=64, block_n=64, splits=1, num_warps=4, num_stages=4)
    block_m = 16 if m <= 16 else 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
    most = triton.cdiv(SPLIT_PROGRAMS_PER_SM * num_sms, tiles)
    splits = max(
        d
        for d in range(1, k_blocks + 1)
        if k_blocks % d == 0 and d <= most and (d == 1 or k_blocks // d >= MIN_BLOCKS_PER_SPLIT)
    )
    return BlockMatmulConfig(block_m=block_m, block_n=64, splits=splits, num_warps=4, num_stages=4)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # an H100's, so that CPU runs pick the configs an H100 would
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _block_matmul_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, x_stride, xs_stride_m, xs_stride_k, w_stride, ws_stride_n,
    ws_stride_k, out_stride_split, out_stride_m, SCALE_BLOCK_N: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Program (t, s) computes output tile t over split s of the K blocks; tiles go GROUP_M rows of tiles at a time."""
    pid, split = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the end read (and later drop) valid ones, so the loads need no mask.
    safe_rows, safe_cols = rows % M, cols % N
    k0 = split * BLOCKS_PER_SPLIT
    k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + safe_rows[:, None].to(tl.int64) * x_stride + k[None, :]
    w_ptrs = w_ptr + safe_cols[None, :].to(tl.int64) * w_stride + k[:, None]
    xs_ptrs = xs_ptr + safe_rows * xs_stride_m + k0 * xs_stride_k
    ws_ptrs = ws_ptr + (safe_cols // SCALE_BLOCK_N) * ws_stride_n + k0 * ws_stride_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(BLOCKS_PER_SPLIT):
        part = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs))
        acc += part * tl.load(xs_ptrs)[:, None] * tl.load(ws_ptrs)[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        xs_ptrs += xs_stride_k
        ws_ptrs += ws_stride_k
    out = out_ptr + split * out_stride_split + rows[:, None].to(tl.int64) * out_stride_m + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _sum_splits_kernel(parts_ptr, y_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """``y = parts.sum(0)`` over contiguous ``parts [SPLITS, numel]``, cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(parts_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check_block_operands(
    xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block_n: int, block_k: int
) -> None:
    (m, k), (n, kw) = xq.shape, w.shape
    if xq.dtype != FP8_DTYPE or w.dtype != FP8_DTYPE or xq.stride(1) != 1 or w.stride(1) != 1 or k != kw:
        raise ValueError("xq [M, K] and w [N, K] must be e4m3 with a unit stride in their last dim")
    if k % block_k or block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of two >= 16 that divides K={k}")
    if tuple(x_scale.shape) != (m, k // block_k) or tuple(w_scale.shape) != (triton.cdiv(n, block_n), k // block_k):
        raise ValueError(f"scales {tuple(x_scale.shape)} and {tuple(w_scale.shape)} do not fit the blocks")


def fp8_block_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_n: int,
    block_k: int,
    out_dtype: torch.dtype,
    *,
    config: BlockMatmulConfig | None = None,
) -> torch.Tensor:
    """Triton :func:`fp8_block_matmul_ref`; ``config`` overrides :func:`block_matmul_config`."""
    _check_block_operands(xq, x_scale, w, w_scale, block_n, block_k)
    (m, k), n = xq.shape, w.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    cfg = config or block_matmul_config(m, n, k // block_k, _num_sms(xq.device))
    if (k // block_k) % cfg.splits:
        raise ValueError(f"splits={cfg.splits} does not divide the {k // block_k} K blocks")
    out = y if cfg.splits == 1 else torch.empty(cfg.splits, m, n, dtype=torch.float32, device=xq.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.splits)
    _block_matmul_kernel[grid](
        xq, x_scale, w, w_scale, out, m, n, xq.stride(0), x_scale.stride(0), x_scale.stride(1), w.stride(0),
        w_scale.stride(0), w_scale.stride(1), out.stride(0) if cfg.splits > 1 else 0, out.stride(-2),
        SCALE_BLOCK_N=block_n, BLOCKS_PER_SPLIT=k // block_k // cfg.splits, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.splits > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, y, m * n, SPLITS=cfg.splits, BLOCK=1024, num_warps=4)
    return y


def fp8_scaled_mm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``xq [M, K]`` times ``w [N, K]``, dequantized to fp32 with ``x_scale`` [M, 1] or one element and
    ``w_scale`` [N] or one element, plus ``bias`` [N]."""
    y = (xq.float() * x_scale.float().reshape(-1, 1)) @ (w.float() * w_scale.float().reshape(-1, 1)).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _scaled_mm_runs(xq: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` takes these operands: a CUDA GPU of compute capability 8.9 or more, K and N
    multiples of 16 (M may be anything)."""
    if not xq.is_cuda or xq.shape[1] % 16 or w.shape[0] % 16:
        return False
    return torch.cuda.get_device_capability(xq.device) >= (8, 9)


def fp8_scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fp8_scaled_mm_ref` through ``torch._scaled_mm`` (cuBLASLt / CUTLASS) where it runs, else the reference.

    Two one-element scales make a tensorwise product; otherwise both are expanded to rowwise ones,
    ``[M, 1]`` and ``[1, N]``. ``torch._scaled_mm`` adds a bias only to 16-bit outputs, so an fp32
    output gets it added afterwards.
    """
    if not _scaled_mm_runs(xq, w):
        return fp8_scaled_mm_ref(xq, x_scale, w, w_scale, out_dtype, bias)
    m, n = xq.shape[0], w.shape[0]
    if x_scale.numel() == 1 and w_scale.numel() == 1:
        scale_a, scale_b = x_scale.float().reshape(()), w_scale.float().reshape(())
    else:
        scale_a = x_scale.float().reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = w_scale.float().reshape(1, -1).expand(1, n).contiguous()
    fused = bias is not None and out_dtype != torch.float32
    y = torch._scaled_mm(
        xq.contiguous(),
        w.contiguous().t(),
        scale_a=scale_a,
        scale_b=scale_b,
        bias=bias.to(out_dtype) if fused else None,
        out_dtype=out_dtype,
    )
    if bias is not None and not fused:
        y += bias.float()
    return y


def fp8_gemv_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """One row x [1, K] (16-bit, not quantized) times e4m3 w [N, K] scaled per channel (``w_scale`` [N]; pass
    ``block_n`` 1 and ``block_k`` K) or per block ([ceil(N / block_n), ceil(K / block_k)]) -> y [1, N]."""
    n, k = w.shape
    scale = w_scale.reshape(-(-n // block_n), -1).float()
    full = scale.repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return (x.float() @ (w.float() * full).T).to(x.dtype)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, ws_ptr, out_ptr, N, x_stride, w_stride, ws_stride_n, ws_stride_k, out_stride_split,
    SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (t, s): outputs ``[t * BLOCK_N, (t + 1) * BLOCK_N)`` over inputs ``[s * CHUNK, (s + 1) * CHUNK)``;
    each K-step's products are summed, then scaled by the step's weight scale (one per block along K)."""
    tile, split = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK_K):
        k = split * CHUNK + step + kk
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * w_stride + k[None, :], mask=row_mask[:, None], other=0.0)
        x = tl.load(x_ptr + k * x_stride).to(tl.float32)
        scale_at = (rows // SCALE_BLOCK_N) * ws_stride_n + (split * CHUNK + step) // SCALE_BLOCK_K * ws_stride_k
        scale = tl.load(ws_ptr + scale_at, mask=row_mask, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1) * scale
    tl.store(out_ptr + split * out_stride_split + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


class GemvConfig(NamedTuple):
    """How :func:`fp8_gemv` tiles one row: output channels per program, inputs per step, and K split until there
    are about ``programs_per_sm`` programs per SM."""

    block_n: int = 64
    block_k: int = 128
    programs_per_sm: int = 4
    num_warps: int = 4
    num_stages: int = 4


def fp8_gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    block_n: int,
    block_k: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Triton :func:`fp8_gemv_ref`: for decode at batch 1, each weight read once, K split over programs until
    the GPU is full; the row is not quantized (W8A16), which also saves its quantization's launch."""
    cfg = config or GemvConfig()
    n, k = w.shape
    if x.shape != (1, k) or w.stride(1) != 1:
        raise ValueError(f"x must be [1, {k}] and w row-major [N, K]")
    block = min(block_k, cfg.block_k)
    if k % block or block % 16:
        raise ValueError(f"K = {k} must be a multiple of the scale block {block} (itself of 16)")
    scale = w_scale.reshape(-(-n // block_n), -1)
    tiles, steps = triton.cdiv(n, cfg.block_n), k // block
    wanted = max(1, min(steps, cfg.programs_per_sm * _num_sms(x.device) // tiles))
    splits = max(d for d in range(1, wanted + 1) if steps % d == 0)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    out = y if splits == 1 else torch.empty(splits, 1, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(tiles, splits)](
        x, w, scale, out, n, x.stride(1), w.stride(0), scale.stride(0), scale.stride(1) if scale.shape[1] > 1 else 0,
        out.stride(0) if splits > 1 else 0, SCALE_BLOCK_N=block_n, SCALE_BLOCK_K=min(block_k, k), CHUNK=k // splits,
        BLOCK_N=cfg.block_n, BLOCK_K=block, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(n, 1024),)](out, y, n, SPLITS=splits, BLOCK=1024, num_warps=4)
    return y
