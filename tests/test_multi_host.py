"""Ranks beyond this process tree, on CPU over gloo: two "hosts" (two process groups of one machine) meeting over
loopback TCP, and ranks on Ray actors of a local Ray instance; both give the output of one rank, and a lost rank
fails its engine with an error that names it, leaving nothing running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import ray

from tests.conftest import generate_all, tiny_engine, wait_gone  # pytest has imported the conftest under this name
from tristream import EngineDeadError, SamplingParams
from tristream.processes import free_port

PROMPTS = [[5, 17, 99, 3, 250], [7] * 12, list(range(40, 70))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)


def assert_close(one: list, two: list) -> None:
    for (tokens1, logprobs1), (tokens2, logprobs2) in zip(one, two):
        assert tokens2 == tokens1
        for step1, step2 in zip(logprobs1, logprobs2):
            assert max(abs(step1[t] - step2[t]) for t in step1) < 1e-5


@pytest.fixture
async def one_rank(tiny_model) -> list:
    async with tiny_engine(tiny_model, 1) as engine:
        return await generate_all(engine, PROMPTS, GREEDY)


def start_host1(model: str, port: int) -> subprocess.Popen:
    """Host 1 of a two-host engine, in its own process group; it learns where to meet from torchrun's variables."""
    env = {**os.environ, "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.Popen(
        [sys.executable, "-m", "tristream", "serve", model, "--load-format", "dummy", "--skip-tokenizer-init",
         "--tp", "2", "--nnodes", "2", "--max-model-len", "256", "--log-level", "ERROR"],
        env=env, start_new_session=True,
    )  # fmt: skip


def rank_pids(title: str) -> list[int]:
    """The processes titled ``title`` (``tristream::gpu1``)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode() == title:
                found.append(int(pid))
    return found


async def test_two_hosts_meet_over_loopback_tcp(tiny_model, one_rank):
    port = free_port()
    host1 = start_host1(tiny_model, port)
    try:
        async with tiny_engine(tiny_model, 2, nnodes=2, dist_init_addr=f"127.0.0.1:{port}") as engine:
            assert set(engine.child_pids) == {"gpu", "tokenizer", "scheduler"}  # rank 1 runs on host 1
            pids = list(engine.child_pids.values())
            assert_close(one_rank, await generate_all(engine, PROMPTS, GREEDY))
        assert await asyncio.to_thread(host1.wait, 30) == 0  # its rank shut down with the engine
        assert wait_gone(pids) == []
    finally:
        host1.kill()


async def test_a_rank_lost_on_another_host_fails_the_engine_and_is_named(tiny_model):
    port = free_port()
    host1 = start_host1(tiny_model, port)
    try:
        engine = tiny_engine(tiny_model, 2, nnodes=2, dist_init_addr=f"127.0.0.1:{port}")
        await engine.start()
        pids = list(engine.child_pids.values())
        [remote] = [pid for pid in rank_pids("tristream::gpu1") if os.getsid(pid) == host1.pid]
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        with pytest.raises(
            EngineDeadError, match=r"^the gpu1 process failed:\nit died on host .* \(killed by SIGKILL\)"
        ):
            async for _ in engine.generate([1, 2, 3], params):
                os.kill(remote, signal.SIGKILL)
        await engine.close()
        assert await asyncio.to_thread(host1.wait, 30) == 1
        assert wait_gone(pids) == []
    finally:
        host1.kill()


def test_a_host_other_than_0_is_refused_in_process(tiny_model):
    with pytest.raises(ValueError, match="--node-rank 1"):
        asyncio.run(tiny_engine(tiny_model, 2, nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:1").start())


def resources_back(timeout: float = 20.0) -> bool:
    """Whether the placement group's CPUs are free again within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU") == 2


async def test_ranks_on_ray_actors_give_the_output_of_one_rank(local_ray, tiny_model, one_rank):
    async with tiny_engine(tiny_model, 2, distributed_executor="ray") as engine:
        pids = list(engine.child_pids.values())
        assert len(pids) == 4 and not ray.available_resources().get("CPU")  # both bundles taken by the ranks
        assert_close(one_rank, await generate_all(engine, PROMPTS, GREEDY))
    assert wait_gone(pids) == [] and resources_back()


async def test_a_lost_ray_actor_fails_the_engine_and_names_its_rank(local_ray, tiny_model):
    engine = tiny_engine(tiny_model, 2, distributed_executor_backend="ray")
    await engine.start()
    pids = list(engine.child_pids.values())
    got = 0

    async def consume():
        nonlocal got
        async for _ in engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)):
            got += 1
            if got == 2:
                engine._procs["gpu1"].kill()

    with pytest.raises(EngineDeadError, match="gpu1 process died"):
        await asyncio.wait_for(consume(), 60)
    await engine.close()
    assert wait_gone(pids) == [] and resources_back()
