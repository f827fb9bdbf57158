"""The KV pool an engine sizes by itself on the GPU: what a probe step leaves under gpu_memory_utilization."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "bench" / "configs" / "llama-3-8b.json"


def test_the_default_kv_budget_fills_what_a_probe_step_leaves(tmp_path):
    from tristream.config import EngineConfig
    from tristream.gpu_proc.runner import ModelRunner
    from tristream.protocol import BatchPlan, NewSequence
    from tristream.sampling_params import SamplingParams

    (tmp_path / "config.json").write_text(json.dumps(json.loads(CONFIG.read_text()) | {"num_hidden_layers": 2}))
    torch.cuda.empty_cache()
    utilization = 0.5
    config = EngineConfig(
        model=str(tmp_path), load_format="dummy", device="cuda", max_model_len=2048, gpu_memory_utilization=utilization
    )
    runner = ModelRunner(config)
    total = torch.cuda.mem_get_info()[1]
    assert runner.kv.pool.numel() * runner.kv.pool.element_size() > 0.2 * total
    assert torch.cuda.memory_reserved() <= utilization * total
    plan = BatchPlan(
        0,
        new=[NewSequence(0, list(range(16)), 0, 0, SamplingParams(temperature=0))],
        pages=[(0, [1])],
        slots=[0],
        num_tokens=[16],
        sample=[True],
    )
    assert 0 <= runner.step(plan).token_ids[0] < runner.model_config.vocab_size
