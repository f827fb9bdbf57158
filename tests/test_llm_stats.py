"""LLM.get_stats(): between calls, and from another thread while generate runs (one engine for the module)."""

from __future__ import annotations

import threading

import pytest

from tristream import LLM, SamplingParams
from tristream.protocol import SchedulerStats


@pytest.fixture(scope="module")
def llm():
    with LLM(max_model_len=256, log_level="WARNING") as llm:
        yield llm


def test_generated_tokens_grow_by_exactly_the_tokens_generated(llm):
    before = llm.get_stats()
    outs = llm.generate(
        ["One", "Two words", "And three words"],
        [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 5, 7)],
        use_tqdm=False,
    )
    after = llm.get_stats()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == 15
    assert after.num_generated_tokens - before.num_generated_tokens == generated
    assert after.num_running == after.num_waiting == 0


def test_a_call_from_another_thread_during_generate_returns(llm):
    seen: list[SchedulerStats] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def sample() -> None:
        try:
            # The first call must find generate running: from another thread, get_stats may not start the loop.
            while not llm._loop.is_running() and not stop.wait(0.001):
                pass
            while not stop.is_set():
                stats = llm.get_stats()
                if stats.num_running:
                    seen.append(stats)
                stop.wait(0.01)
        except BaseException as e:
            errors.append(e)
            raise

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        llm.generate(["Count slowly:"] * 2, SamplingParams(max_tokens=48, ignore_eos=True), use_tqdm=False)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and not errors
    assert seen, "no stats came back while requests were running"
    assert llm.get_stats().num_running == 0
