"""Quantized weights: which method a checkpoint's ``quantization_config`` or the ``quantization`` argument selects.

Read in the user's process, so that an unsupported checkpoint fails at start-up before any engine process runs,
and again in each gpu_proc, which builds the layers the spec describes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# What ``quantization`` may name: a method of the checkpoint, or one to quantize a 16/32-bit checkpoint with.
METHODS = ("fp8", "awq", "gptq", "int8")
# What the checkpoints' ``quant_method`` may be.
CHECKPOINT_METHODS = ("fp8 (compressed-tensors or block-wise)", "awq (GEMM, 4-bit)", "gptq (4-bit, desc_act false)")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(frozen=True)
class QuantSpec:
    """How the decoder's linear layers hold their weights.

    - ``fp8``: e4m3 weights with one scale per output channel (per-tensor checkpoint scales are spread over
      their channels), or with ``block`` = (rows, columns) scales; activations are quantized per token
      (per 1 x columns group with blocks), or with ``static_input`` by the checkpoint's per-tensor scale.
    - ``awq`` and ``gptq``: 4-bit weights with a scale and a zero per ``group_size`` inputs (0: all of them);
      a GPTQ checkpoint stores each zero minus ``zero_offset``.
    - ``int8``: weight-only int8 with one scale per output channel, made at load (CPU).

    ``from_checkpoint`` is False when the weights are quantized at load from a 16/32-bit checkpoint.
    The embedding and the LM head are never quantized.
    """

    method: str
    from_checkpoint: bool = True
    block: tuple[int, int] | None = None
    static_input: bool = False
    group_size: int = 0
    zero_offset: int = 0

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.method == "fp8":
            weights = f"{self.block[0]}x{self.block[1]} block scales" if self.block else "per-channel scales"
            acts = "static per-tensor" if self.static_input else ("per-group" if self.block else "per-token")
            kind = f"fp8 e4m3 weights ({weights}), {acts} fp8 activations"
        elif self.method == "int8":
            kind = "int8 weights (per-channel scales), 16-bit activations"
        else:
            group = f"group size {self.group_size}" if self.group_size else "one group"
            kind = f"{self.method} 4-bit weights ({group}), 16-bit activations"
        return kind + ("" if self.from_checkpoint else ", quantized at load")


def quant_spec(
    quantization_config: dict | None, requested: str | None, dummy: bool = False, experts: int = 0
) -> QuantSpec | None:
    """The spec of a checkpoint's ``quantization_config`` (None: unquantized) and the ``quantization``
    argument; a ValueError names an unsupported method or a mismatch. A mixture-of-experts model (with
    ``experts``) takes only a block-wise fp8 checkpoint, whose experts are dequantized at load (they have no
    fp8 kernel). With ``dummy`` (random weights), the method quantizes random 16-bit weights at load, in the
    checkpoint's layout where it names one."""
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization={requested!r} is not supported; choose one of {', '.join(METHODS)}")
    if quantization_config is None:
        if experts and requested is not None:
            raise ValueError(f"quantization={requested!r} at load is not supported for a mixture-of-experts model")
        if requested in ("awq", "gptq") and not dummy:
            raise ValueError(f"quantization={requested!r} needs a checkpoint quantized with {requested}")
        if requested is None:
            return None
        return QuantSpec(requested, from_checkpoint=False, group_size=128 if requested in ("awq", "gptq") else 0)
    method = str(quantization_config.get("quant_method", "")).lower()
    parse = {"compressed-tensors": _compressed_tensors, "fp8": _fp8, "awq": _awq, "gptq": _gptq}.get(method)
    if parse is None:
        raise ValueError(
            f"the checkpoint is quantized with {method or 'an unnamed method'!r}, which is not supported; "
            f"supported: {', '.join(CHECKPOINT_METHODS)}"
        )
    spec = parse(quantization_config)
    if requested is not None and requested != spec.method:
        raise ValueError(f"quantization={requested!r}, but the checkpoint is quantized with {spec.method}")
    if experts and (spec.method != "fp8" or spec.block is None):
        raise ValueError(
            f"a mixture-of-experts checkpoint quantized as {spec.describe()} is not supported: "
            "only block-wise fp8 (weight_block_size) is, or a 16-bit checkpoint"
        )
    return dataclasses.replace(spec, from_checkpoint=False, static_input=False) if dummy else spec


def _compressed_tensors(qc: dict) -> QuantSpec:
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: one config group is supported, the checkpoint has {len(groups)}")
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8 or (acts and acts.get("type") != "float"):
        raise ValueError(
            f"compressed-tensors: only fp8 weights and activations are supported, not {weights.get('type')} "
            f"{weights.get('num_bits')}-bit; supported: {', '.join(CHECKPOINT_METHODS)}"
        )
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors: fp8 weight strategy {strategy!r} is not supported")
    if acts is not None and not acts.get("dynamic", False) and acts.get("strategy") != "tensor":
        raise ValueError(f"compressed-tensors: static {acts.get('strategy')!r} activation scales are not supported")
    block = tuple(weights["block_structure"]) if strategy == "block" else None
    static = acts is not None and not acts.get("dynamic", False)
    _only_lm_head(qc.get("ignore"))
    return QuantSpec("fp8", block=block, static_input=static)


def _fp8(qc: dict) -> QuantSpec:
    block = qc.get("weight_block_size")
    static = qc.get("activation_scheme", "dynamic") == "static"
    if block is not None and static:
        raise ValueError("fp8: block-wise weights with static activation scales are not supported")
    _only_lm_head(qc.get("ignored_layers") or qc.get("modules_to_not_convert"))
    return QuantSpec("fp8", block=tuple(block) if block else None, static_input=static)


def _only_lm_head(ignored: list[str] | None) -> None:
    """Refuse a checkpoint that keeps some decoder projections unquantized (only the LM head may be)."""
    kept = [name for name in ignored or () if name.split(".")[-1] != "lm_head"]
    if kept:
        raise ValueError(f"the checkpoint keeps {kept[:4]} unquantized; mixed-precision checkpoints are not supported")


def _int4(qc: dict, method: str) -> int:
    if qc.get("bits", 4) != 4:
        raise ValueError(f"{method}: only 4-bit weights are supported, not {qc.get('bits')}-bit")
    group = qc.get("group_size", 128)
    return 0 if group in (-1, None) else int(group)


def _awq(qc: dict) -> QuantSpec:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or not qc.get("zero_point", True):
        raise ValueError(f"awq: only the GEMM layout with zero points is supported, not {version!r}")
    _only_lm_head(qc.get("modules_to_not_convert"))
    return QuantSpec("awq", group_size=_int4(qc, "awq"))


def _gptq(qc: dict) -> QuantSpec:
    if qc.get("desc_act"):
        raise ValueError("gptq: desc_act=true (activation order) is not supported; use a checkpoint without it")
    offset = 0 if qc.get("checkpoint_format") == "gptq_v2" else 1
    return QuantSpec("gptq", group_size=_int4(qc, "gptq"), zero_offset=offset)
