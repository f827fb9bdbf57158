"""Forked KV pages, grammar bitmasks and the sampler on CUDA agree with the CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream import SamplingParams
from tristream.gpu_proc.grammar import apply_token_bitmask
from tristream.gpu_proc.kv_cache import KVCache
from tristream.gpu_proc.sampler import Sampler, SamplingState

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 128256


def test_copy_pages_copies_every_layer_k_and_v():
    pool = torch.randn(4, 2, 10, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    before = pool.clone()
    KVCache(pool).copy_pages([(3, 7), (4, 8)])
    assert torch.equal(pool[:, :, 7], before[:, :, 3]) and torch.equal(pool[:, :, 8], before[:, :, 4])
    untouched = [p for p in range(10) if p not in (7, 8)]
    assert torch.equal(pool[:, :, untouched], before[:, :, untouched])


def test_bitmask_and_sampler_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (6, (VOCAB + 31) // 32), generator=g, dtype=torch.int64).int()
    bitmask[0] = -1
    assert torch.equal(apply_token_bitmask(logits, bitmask), apply_token_bitmask(logits.cuda(), bitmask.cuda()).cpu())
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(temperature=1.0, top_k=40, min_p=0.05, repetition_penalty=1.2, seed=2),
        SamplingParams(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=3, logprobs=3),
        SamplingParams(temperature=1.2, logit_bias={5: 3.0}, seed=4),
        SamplingParams(temperature=0.5, seed=5),
    ]
    tokens = {}
    for device in ("cpu", "cuda"):
        state = SamplingState(8, VOCAB, [2], torch.device(device))
        for slot, p in enumerate(params):
            state.set(slot, p, list(range(100, 160)), 20)
        out, lp = Sampler(state).sample(
            logits.to(device), torch.arange(6, device=device), list(range(6)), bitmask.to(device)
        )
        tokens[device] = (out.tolist(), lp[3][0][0])
    assert tokens["cpu"] == tokens["cuda"]
