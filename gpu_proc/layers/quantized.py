"""How a ``Linear`` holds its weight: as it is (``Dense``), or quantized (``Fp8``, ``Int4``, ``Int8``).

A scheme creates the layer's parameters, says how each lies against the weight's [out, in] so that the
loader can place a rank's part of it (``Layout``), turns a checkpoint tensor into its parameter
(``checkpoint``), finishes the layer once every part is loaded (``finish``), and multiplies (``apply``).
A scheme that quantizes at load (``from_checkpoint`` False) loads a dense weight and quantizes it in ``finish``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tristream.gpu_proc import ops
from tristream.kernels import int4
from tristream.quantization import QuantSpec

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


@dataclass(frozen=True)
class Layout:
    """Where a parameter lies against its weight [out, in]: for each of the two, the parameter's dim and how many
    weight rows (or columns) one of its entries covers, or None where it is not split (each rank holds it whole).
    ``per_part`` parameters hold one entry per fused part (indexed by the part)."""

    out: tuple[int, int] | None = (0, 1)
    inp: tuple[int, int] | None = (1, 1)
    per_part: bool = False


VECTOR = Layout(inp=None)


class Dense:
    """The weight as it is, in the model's dtype."""

    def create(self, layer: nn.Module, n_in: int, n_out: int, parts: int) -> None:
        layer.weight = nn.Parameter(torch.empty(n_out, n_in))

    def layout(self, name: str) -> Layout:
        return Layout() if name == "weight" else VECTOR

    def checkpoint(self, name: str, tensor: object) -> tuple[str, object] | None:
        return name, tensor

    def finish(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def kernels(self, device: torch.device) -> str:
        """Which kernels multiply, on ``device`` (for the start-up log)."""
        return "torch"


class Fp8(Dense):
    """e4m3 weights with per-channel scales (``weight_scale`` [out]; a checkpoint's per-tensor scale fills its
    part's channels) or block scales ([out / rows, in / columns]); activations quantized per token, per group of
    a block's columns, or by the checkpoint's static scale (the largest of a fused layer's parts)."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec

    def create(self, layer: nn.Module, n_in: int, n_out: int, parts: int) -> None:
        if not self.spec.from_checkpoint:
            return super().create(layer, n_in, n_out, parts)
        layer.weight = nn.Parameter(torch.empty(n_out, n_in, dtype=FP8), requires_grad=False)
        block = self.spec.block
        shape = (n_out,) if block is None else (-(-n_out // block[0]), -(-n_in // block[1]))
        layer.weight_scale = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        if self.spec.static_input:
            layer.input_scale = nn.Parameter(torch.empty(parts, dtype=torch.float32), requires_grad=False)

    def layout(self, name: str) -> Layout:
        if name == "weight_scale" and self.spec.block is not None:
            return Layout((0, self.spec.block[0]), (1, self.spec.block[1]))
        return Layout(None, None, per_part=True) if name == "input_scale" else super().layout(name)

    def checkpoint(self, name: str, tensor: object) -> tuple[str, object] | None:
        if name in ("weight_scale", "weight_scale_inv", "input_scale") and self.spec.from_checkpoint:
            scale = tensor[...].float()
            if self.spec.block is None:  # one number per tensor, or [out, 1] per channel
                scale = scale.reshape(()) if scale.numel() == 1 else scale.flatten()
            return "weight_scale" if name != "input_scale" else name, scale
        return name, tensor

    def finish(self, layer: nn.Module) -> None:
        if not self.spec.from_checkpoint:
            weight, scale = quantize_fp8(layer.weight.detach(), self.spec.block)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        elif self.spec.static_input:
            layer.input_scale = nn.Parameter(layer.input_scale.max().reshape(1), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.spec.block is not None:
            return ops.fp8_block_linear(x, layer.weight, layer.weight_scale, self.spec.block, layer.bias)
        static = layer.input_scale if self.spec.static_input else None
        return ops.fp8_linear(x, layer.weight, layer.weight_scale, static, layer.bias)

    def kernels(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "torch reference (dequantize, then matmul)"
        many = "Triton block-scaled GEMM" if self.spec.block else "torch._scaled_mm (row-wise scales)"
        return f"{many}; one row: Triton fp8-weight GEMV"


class Int4(Dense):
    """AWQ and GPTQ 4-bit weights, held in one layout (``tristream.kernels.int4``): ``qweight`` [in / 8, out],
    ``scales`` and ``zeros`` [groups, out]. A GPTQ checkpoint's ``g_idx`` must be the plain one (no act-order)."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec

    def group(self, n_in: int) -> int:
        return self.spec.group_size or n_in

    def create(self, layer: nn.Module, n_in: int, n_out: int, parts: int) -> None:
        if not self.spec.from_checkpoint:
            return super().create(layer, n_in, n_out, parts)
        group = self.group(n_in)
        if n_in % 8 or n_in % group:
            raise ValueError(f"{self.spec.method}: {n_in} inputs do not split into groups of {group} (and of 8)")
        layer.qweight = nn.Parameter(torch.empty(n_in // 8, n_out, dtype=torch.int32), requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(n_in // group, n_out), requires_grad=False)
        layer.zeros = nn.Parameter(torch.empty(n_in // group, n_out), requires_grad=False)

    def layout(self, name: str) -> Layout:
        if name == "qweight":
            return Layout((1, 1), (0, 8))
        if name in ("scales", "zeros"):
            return Layout((1, 1), (0, self.spec.group_size) if self.spec.group_size else None)
        return super().layout(name)

    def checkpoint(self, name: str, tensor: object) -> tuple[str, object] | None:
        awq = self.spec.method == "awq"
        if name == "qweight":
            return name, int4.awq_qweight(tensor[:]) if awq else tensor
        if name == "qzeros":
            zeros = int4.unpack_columns(tensor[:], awq)
            return "zeros", zeros + self.spec.zero_offset
        if name == "g_idx":
            return None
        return name, tensor

    def finish(self, layer: nn.Module) -> None:
        if not self.spec.from_checkpoint:
            qweight, scales, zeros = int4.quantize(layer.weight.detach().T, self.group(layer.in_features))
            del layer.weight
            layer.qweight = nn.Parameter(qweight, requires_grad=False)
            layer.scales = nn.Parameter(scales, requires_grad=False)
            layer.zeros = nn.Parameter(zeros, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = ops.w4a16_matmul(x, layer.qweight, layer.scales, layer.zeros, self.group(layer.in_features))
        return y if layer.bias is None else y + layer.bias

    def kernels(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "torch reference (dequantize, then matmul)"
        return "Triton W4A16 (split-K for few rows); one row: Triton int4 GEMV"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] as int8 with a bf16 scale per output channel."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.to(torch.bfloat16)


def int8_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (w * scale).T`` through torch's CPU int8 weight-pack matmul, which takes bf16 activations."""
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, scale).to(x.dtype)


class Int8(Dense):
    """Weight-only int8 on the CPU: a 16/32-bit weight quantized at load, one scale per output channel."""

    def finish(self, layer: nn.Module) -> None:
        weight, scale = quantize_int8(layer.weight.detach())
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, layer.weight, layer.weight_scale)
        return y if layer.bias is None else y + layer.bias

    def kernels(self, device: torch.device) -> str:
        return "torch int8 weight-pack matmul"


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] as e4m3 with a scale per output channel [out], or per ``block`` [out / rows, in / columns]."""
    if block is None:
        scale = w.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX
        return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    (n, k), (bn, bk) = w.shape, block
    padded = F.pad(w.float(), (0, -k % bk, 0, -n % bn)).unflatten(1, (-1, bk)).unflatten(0, (-1, bn))
    scale = padded.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (padded / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).flatten(2).flatten(0, 1)[:n, :k]
    return q.to(FP8), scale


def scheme(spec: QuantSpec | None) -> Dense:
    """The scheme of ``spec`` (None: dense)."""
    if spec is None:
        return Dense()
    return {"fp8": Fp8, "awq": Int4, "gptq": Int4}.get(spec.method, lambda _: Int8())(spec)
