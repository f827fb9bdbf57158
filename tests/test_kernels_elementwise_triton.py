"""The Triton RMSNorm, RoPE and SiLU-and-mul kernels against their torch references.

Without a GPU the kernels run in Triton's interpreter, in fp32 and fp16.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tristream.gpu_proc.layers.rotary import RotaryEmbedding
from tristream.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref, silu_and_mul, silu_and_mul_ref
from tristream.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from tristream.kernels.rope import (
    apply_rope,
    apply_rope_ref,
    rope_cos_sin,
    rope_frequencies,
    rope_inv_freq,
    rope_tables,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
EPS = 1e-6
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE, generator=g)


# ---------------------------------------------------------------- RMSNorm

# (tokens, hidden): the bundled model's 576, a non-power-of-two 1536, one token, and
# 9000, past the largest block, so the row is covered in chunks with a ragged last one.
NORM_SHAPES = [(7, 576), (5, 1536), (1, 64), (3, 9000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = gen(shape[1])
    x = randn(*shape, dtype=dtype, g=g) * 3
    weight = 1 + randn(shape[1], dtype=dtype, g=g) * 0.1
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, rms_norm_ref(x, weight, EPS)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_of_a_fused_projection(dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: [T, H, D] views into a fused qkv output, normalised per head."""
    g = gen(3)
    tokens, heads, kv_heads, head_dim = 6, 9, 3, 64
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, g=g)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    weight = 1 + randn(head_dim, dtype=dtype, g=g) * 0.1
    before = qkv.clone()
    for t in (q, k):
        out = rms_norm(t, weight, EPS)
        assert out.shape == t.shape
        assert rel_err(out, rms_norm_ref(t, weight, EPS)) < TOL[dtype]
    assert torch.equal(qkv, before)


def test_rms_norm_fp32_weight_promotes_like_the_reference() -> None:
    g = gen(4)
    x = randn(4, 576, dtype=torch.float16, g=g)
    weight = 1 + randn(576, dtype=torch.float32, g=g) * 0.1
    out = rms_norm(x, weight, EPS)
    assert out.dtype == torch.float32
    assert rel_err(out, rms_norm_ref(x, weight, EPS)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = gen(shape[0] + shape[1])
    x = randn(*shape, dtype=dtype, g=g)
    residual = randn(*shape, dtype=dtype, g=g) * 2
    weight = 1 + randn(shape[1], dtype=dtype, g=g) * 0.1
    ref_out, ref_residual = add_rms_norm_ref(x, residual, weight, EPS)
    x_before = x.clone()
    out, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert new_residual is residual
    assert rel_err(new_residual, ref_residual) < TOL[dtype]
    assert rel_err(out, ref_out) < TOL[dtype]
    assert torch.equal(x, x_before)


# ---------------------------------------------------------------- RoPE

# (theta, scaling, heads, kv heads, head dim)
ROPE_CASES = [(500000.0, LLAMA3_SCALING, 9, 3, 64), (1e6, None, 32, 8, 128), (10000.0, None, 5, 1, 96)]
MAX_POS = 4096


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["qkv-views", "contiguous"])
@pytest.mark.parametrize("theta,scaling,heads,kv_heads,head_dim", ROPE_CASES)
def test_apply_rope(
    theta: float, scaling: dict | None, heads: int, kv_heads: int, head_dim: int, fused: bool, dtype: torch.dtype
) -> None:
    g = gen(heads * head_dim)
    tokens = 13
    cos, sin = (t.to(DEVICE) for t in rope_cos_sin(rope_inv_freq(head_dim, theta, scaling), MAX_POS))
    positions = torch.randint(0, MAX_POS, (tokens,), device=DEVICE, generator=g)
    q_width, k_width = heads * head_dim, kv_heads * head_dim
    if fused:
        qkv = randn(tokens, q_width + 2 * k_width, dtype=dtype, g=g)
        q = qkv[:, :q_width].view(tokens, heads, head_dim)
        k = qkv[:, q_width : q_width + k_width].view(tokens, kv_heads, head_dim)
        v_before = qkv[:, q_width + k_width :].clone()
    else:
        q = randn(tokens, heads, head_dim, dtype=dtype, g=g)
        k = randn(tokens, kv_heads, head_dim, dtype=dtype, g=g)
    ref_q, ref_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin)
    out_q, out_k = apply_rope(q, k, positions, cos, sin)
    assert out_q is q and out_k is k
    assert rel_err(q, ref_q) < TOL[dtype]
    assert rel_err(k, ref_k) < TOL[dtype]
    if fused:
        assert torch.equal(qkv[:, q_width + k_width :], v_before)


def test_apply_rope_position_zero_is_identity() -> None:
    g = gen(5)
    cos, sin = (t.to(DEVICE) for t in rope_cos_sin(rope_inv_freq(64, 1e6, None), 16))
    q = randn(3, 4, 64, dtype=torch.float32, g=g)
    k = randn(3, 2, 64, dtype=torch.float32, g=g)
    q0, k0 = q.clone(), k.clone()
    apply_rope(q, k, torch.zeros(3, dtype=torch.int64, device=DEVICE), cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)


# (heads, kv heads, head dim, rotary dim, interleaved): GLM-4's interleaved half-rotated heads, ERNIE 4.5's
# interleaved whole ones, Phi-4-mini's rotate-half three quarters (36 pairs: a ragged block), a narrow one.
ROPE_VARIANTS = [(8, 2, 128, 64, True), (5, 1, 64, 64, True), (6, 2, 96, 72, False), (3, 3, 32, 8, True)]
VARIANT_TOL = {torch.float32: 1e-6, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim,interleaved", ROPE_VARIANTS)
def test_apply_rope_variants(
    heads: int, kv_heads: int, head_dim: int, rotary_dim: int, interleaved: bool, dtype: torch.dtype
) -> None:
    """Interleaved and partial rotation of a fused qkv output; the dims past ``rotary_dim`` and v stay as they were."""
    g = gen(heads * rotary_dim)
    tokens = 11
    cos, sin = (t.to(DEVICE) for t in rope_tables(rotary_dim, 10000.0, None, MAX_POS))
    positions = torch.randint(0, MAX_POS, (tokens,), device=DEVICE, generator=g)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, g=g)
    before = qkv.clone()
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    ref_q, ref_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin, interleaved)
    apply_rope(q, k, positions, cos, sin, interleaved)
    assert rel_err(q, ref_q) < VARIANT_TOL[dtype]
    assert rel_err(k, ref_k) < VARIANT_TOL[dtype]
    rotated = torch.zeros(heads + 2 * kv_heads, head_dim, dtype=torch.bool, device=DEVICE)
    rotated[: heads + kv_heads, :rotary_dim] = True
    unrotated = ~rotated.flatten()
    assert torch.equal(qkv[:, unrotated], before[:, unrotated])
    assert not torch.equal(qkv[:, ~unrotated], before[:, ~unrotated])


def hf_rotary(family: str, config_kwargs: dict) -> tuple[object, object, object]:
    """transformers' config, rotary embedding module and ``apply_rotary_pos_emb`` of a tiny ``family`` model."""
    config = AutoConfig.for_model(
        family, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, **config_kwargs
    )
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    embedding = next(v for n, v in vars(module).items() if n.endswith("RotaryEmbedding") and n != "RotaryEmbedding")
    return config, embedding(config), module.apply_rotary_pos_emb


def short_long_factors(dim: int) -> dict:
    return {"short_factor": [1 + i / dim for i in range(dim // 2)], "long_factor": [1 + i for i in range(dim // 2)]}


# (family, config, interleaved): Llama's rotate-half with llama3 scaling, GLM-4's interleaved pairs over half of
# each head (its default partial_rotary_factor), ERNIE 4.5's interleaved ones in fp32, Phi-3's longrope over three
# quarters of each head (Phi-4-mini's partial_rotary_factor).
HF_ROPE_CASES = [
    ("llama", dict(head_dim=32, rope_parameters={**LLAMA3_SCALING, "original_max_position_embeddings": 64}), False),
    ("glm4", dict(head_dim=32, rope_theta=10000.0), True),
    ("ernie4_5", dict(head_dim=32), True),
    (
        "phi3",
        dict(
            partial_rotary_factor=0.75,
            original_max_position_embeddings=64,
            rope_scaling={"rope_type": "longrope", **short_long_factors(24)},
        ),
        False,
    ),
]


@pytest.mark.parametrize("family,config_kwargs,interleaved", HF_ROPE_CASES, ids=[c[0] for c in HF_ROPE_CASES])
def test_rope_matches_transformers(family: str, config_kwargs: dict, interleaved: bool) -> None:
    """RotaryEmbedding (the reference on the CPU) and the kernel against the family's own rotary embedding and
    ``apply_rotary_pos_emb``, in fp32, at positions within the pretraining context."""
    config, hf_embedding, hf_apply = hf_rotary(family, dict(max_position_embeddings=512, **config_kwargs))
    params = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = RotaryEmbedding(
        head_dim,
        params["rope_theta"],
        params,
        256,
        torch.device("cpu"),
        interleaved=interleaved,
        max_position_embeddings=512,
    )
    assert rotary.rotary_dim == int(head_dim * params.get("partial_rotary_factor", 1.0))
    g = torch.Generator().manual_seed(len(family))
    positions = torch.randint(0, 64, (9,), generator=g).sort().values
    q, k = torch.randn(9, 4, head_dim, generator=g), torch.randn(9, 2, head_dim, generator=g)
    cos, sin = hf_embedding(q, positions[None])
    hf_q, hf_k = (t[0].transpose(0, 1) for t in hf_apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin))
    assert torch.allclose(rotary.cos[positions], cos[0], rtol=0, atol=1e-7)
    assert torch.allclose(rotary.sin[positions], sin[0], rtol=0, atol=1e-7)
    ref_q, ref_k = rotary(q, k, positions)
    assert rel_err(ref_q, hf_q) < 1e-6 and rel_err(ref_k, hf_k) < 1e-6
    tables = rotary.cos.to(DEVICE), rotary.sin.to(DEVICE)
    out_q, out_k = apply_rope(q.to(DEVICE), k.to(DEVICE), positions.to(DEVICE), *tables, interleaved)
    assert rel_err(out_q.cpu(), hf_q) < 1e-6 and rel_err(out_k.cpu(), hf_k) < 1e-6


def test_longrope_tables_past_the_pretraining_context() -> None:
    """Rows from original_max_position_embeddings on take long_factor, as transformers' Phi-3 does for each token
    decoded there; rows below it keep short_factor, as for a sequence within that length."""
    config, hf_embedding, _ = hf_rotary(
        "phi3",
        dict(
            max_position_embeddings=512,
            original_max_position_embeddings=64,
            rope_scaling={"rope_type": "longrope", **short_long_factors(32)},
        ),
    )
    params = config.rope_parameters
    cos, sin = rope_tables(32, params["rope_theta"], params, 300, config.max_position_embeddings)
    x = torch.zeros(1)
    hf_cos, hf_sin = hf_embedding(x, torch.arange(64)[None])
    assert torch.allclose(cos[:64], hf_cos[0], rtol=0, atol=1e-7) and torch.allclose(
        sin[:64], hf_sin[0], rtol=0, atol=1e-7
    )
    for pos in (64, 65, 299):
        hf_cos, hf_sin = hf_embedding(x, torch.tensor([[pos]]))
        assert torch.allclose(cos[pos], hf_cos[0, 0], rtol=0, atol=1e-6), pos
        assert torch.allclose(sin[pos], hf_sin[0, 0], rtol=0, atol=1e-6), pos


# rope scalings of the added families: linear; yarn as in Qwen3 configs, with DeepSeek-V3's mscale pair, with a
# given attention factor and no truncation, and without a factor (the context ratio); Phi-3's longrope without a
# factor (the context ratio) and with one and an attention factor.
FREQ_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "yarn-attention": {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 128,
        "attention_factor": 0.8,
        "truncate": False,
    },
    "yarn-no-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 64},
    "longrope-factor": {
        "rope_type": "longrope",
        "original_max_position_embeddings": 64,
        "factor": 3.0,
        "attention_factor": 1.1,
    },
}


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("name", list(FREQ_SCALINGS))
def test_rope_frequencies_match_transformers(name: str, partial: float) -> None:
    """inv_freq and the attention factor against transformers' ROPE_INIT_FUNCTIONS (longrope: short and long)."""
    head_dim, theta = 64, 1e6
    rotary_dim = int(head_dim * partial)
    scaling = dict(FREQ_SCALINGS[name])
    if scaling["rope_type"] == "longrope":
        scaling |= short_long_factors(rotary_dim)
    params = scaling | {"rope_theta": theta, "partial_rotary_factor": partial}
    config = AutoConfig.for_model(
        "llama", hidden_size=256, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=1024,
        rope_parameters=params,
    )  # fmt: skip
    for seq_len in (None, 65) if scaling["rope_type"] == "longrope" else (None,):
        hf_inv_freq, hf_attention = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, None, seq_len=seq_len)
        inv_freq, attention = rope_frequencies(rotary_dim, theta, scaling, 1024, seq_len)
        assert inv_freq.shape == hf_inv_freq.shape
        assert torch.allclose(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
        assert attention == pytest.approx(hf_attention, rel=1e-12)
    cos, _ = rope_tables(rotary_dim, theta, scaling, 8, 1024)
    assert cos[0].tolist() == [pytest.approx(attention)] * rotary_dim


@pytest.mark.parametrize("kind", ["dynamic", "no-such-rope"])
def test_unknown_rope_type_raises(kind: str) -> None:
    with pytest.raises(ValueError, match=kind):
        rope_tables(64, 10000.0, {"rope_type": kind, "factor": 2.0}, 16)


def test_rope_inv_freq_refuses_scaled_tables() -> None:
    """yarn and longrope also scale cos and sin, which inverse frequencies alone would drop."""
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(64, 10000.0, FREQ_SCALINGS["yarn"])


# ---------------------------------------------------------------- SiLU and mul

# (tokens, intermediate): 28672 spans many column blocks of a row.
SILU_SHAPES = [(7, 576), (5, 1536), (1, 100), (2, 28672)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_silu_and_mul(shape: tuple[int, int], dtype: torch.dtype) -> None:
    tokens, inter = shape
    x = randn(tokens, 2 * inter, dtype=dtype, g=gen(inter)) * 4
    out = silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    assert rel_err(out, silu_and_mul_ref(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SILU_SHAPES[:3])
def test_gelu_tanh_and_mul(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Gemma's activation, against torch's tanh-approximated GELU."""
    tokens, inter = shape
    x = randn(tokens, 2 * inter, dtype=dtype, g=gen(inter)) * 4
    out = gelu_tanh_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    assert rel_err(out, gelu_tanh_and_mul_ref(x)) < TOL[dtype]
    assert rel_err(out, silu_and_mul_ref(x)) > 1e-2, "a different activation from SiLU"


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_of_a_strided_view(dtype: torch.dtype) -> None:
    """Rows of x need not be adjacent: here x is the left part of a wider tensor."""
    wide = randn(6, 2 * 1536 + 40, dtype=dtype, g=gen(6)) * 4
    x = wide[:, : 2 * 1536]
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) < TOL[dtype]
