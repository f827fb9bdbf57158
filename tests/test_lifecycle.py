"""Start-up errors, child death, shutdown, and no orphans after the parent is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import wait_gone  # pytest has imported the conftest under this name
from tristream import LLM, AsyncEngine, EngineDeadError, SamplingParams


async def test_unknown_model_path_fails_at_start_with_the_path():
    engine = AsyncEngine(model="/no/such/model-dir")
    with pytest.raises(FileNotFoundError, match="/no/such/model-dir"):
        await engine.start()
    assert engine.child_pids == {}


def test_unknown_engine_argument_is_rejected():
    with pytest.raises(TypeError, match="max_num_seq"):
        AsyncEngine(max_num_seq=4)
    with pytest.raises(ValueError, match="page_size"):
        AsyncEngine(page_size=0)


async def test_error_in_a_child_during_start_reaches_the_caller():
    engine = AsyncEngine(kv_cache_bytes=1000, log_level="ERROR")
    with pytest.raises(RuntimeError) as info:
        await engine.start()
    assert "gpu process failed" in str(info.value) and "less than one page" in str(info.value)
    assert wait_gone(engine.child_pids.values()) == []


async def test_a_dead_child_fails_pending_requests_and_the_engine():
    engine = AsyncEngine(max_model_len=512, log_level="ERROR")
    await engine.start()
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    got = []
    calls = []

    async def consume():
        async for out in engine.generate("Tell me everything about the ocean.", params):
            got.append(out)
            if len(got) == 2:
                # A call the stopped scheduler cannot answer is pending when the gpu process dies.
                os.kill(engine.child_pids["scheduler"], signal.SIGSTOP)
                calls.append(asyncio.ensure_future(engine.get_stats(timeout=60)))
                await asyncio.sleep(0.1)
                os.kill(engine.child_pids["gpu"], signal.SIGKILL)

    with pytest.raises(EngineDeadError, match="gpu process died"):
        await asyncio.wait_for(consume(), 30)
    with pytest.raises(EngineDeadError, match="gpu process died"):
        await asyncio.wait_for(calls[0], 5)
    assert not engine.is_running
    with pytest.raises(EngineDeadError):
        async for _ in engine.generate("Hello", params):
            pass
    await engine.close()
    assert wait_gone(engine.child_pids.values()) == []


def test_llm_context_leaves_no_child_alive(alive):
    with LLM(max_model_len=256, log_level="ERROR") as llm:
        pids = list(llm.engine.child_pids.values())
        assert len(pids) == 3 and all(alive(p) for p in pids)
        out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2
    assert wait_gone(pids, timeout=1.0) == []


PARENT = """
import sys, time
from tristream import LLM
llm = LLM(max_model_len=256, log_level="ERROR")
print(" ".join(str(p) for p in llm.engine.child_pids.values()), flush=True)
time.sleep(120)
"""


def test_children_die_with_a_killed_parent(alive, tmp_path):
    # Not from the repository root, whose kernels/ folder would hide the package of that name transformers imports.
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        parent.kill()
        parent.wait(10)
        assert wait_gone(pids, timeout=5.0) == []
    finally:
        parent.kill()


async def test_close_takes_well_under_a_second_even_mid_generation(alive):
    """Children exit without the interpreter's teardown, and no socket waits to reach a peer that has gone."""
    engine = AsyncEngine(max_model_len=256, log_level="ERROR")
    await engine.start()
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run() -> None:
        async for _ in engine.generate("Tell me a long story.", params):
            pass

    running = [asyncio.ensure_future(run()) for _ in range(4)]
    await asyncio.sleep(1.0)
    pids = list(engine.child_pids.values())
    start = time.monotonic()
    await engine.close()
    assert time.monotonic() - start < 1.0
    assert [p for p in pids if alive(p)] == []
    assert [type(r) for r in await asyncio.gather(*running, return_exceptions=True)] == [EngineDeadError] * 4
    assert all(proc.exitcode == 0 for proc in engine._procs.values())
