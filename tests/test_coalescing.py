"""A stream that falls behind the engine takes the steps it missed as one output, losing nothing."""

from __future__ import annotations

import asyncio

from tristream import SamplingParams
from tristream.outputs import ToolCall
from tristream.protocol import OutputDelta


def test_deltas_of_one_sample_merge_in_order():
    a = OutputDelta("r", "Hel", [1], False, prompt_token_ids=[9], time_in_queue=0.5, logprobs=[[(1, -0.1)]])
    b = OutputDelta("r", "lo", [2, 3], True, "stop", logprobs=[[(2, -0.2)], [(3, -0.3)]])
    merged = a.then(b)
    assert (merged.text, merged.token_ids, merged.finished, merged.finish_reason) == ("Hello", [1, 2, 3], True, "stop")
    assert merged.logprobs == [[(1, -0.1)], [(2, -0.2)], [(3, -0.3)]]
    assert (merged.prompt_token_ids, merged.time_in_queue) == ([9], 0.5)


def test_tool_call_fragments_merge_and_the_earlier_delta_is_untouched():
    first = ToolCall(0, "call_1", "get_weather", "")
    a = OutputDelta("r", "", [1], False, tool_calls=[first, ToolCall(0, None, None, '{"city": ')])
    b = OutputDelta("r", "", [2], False, tool_calls=[ToolCall(0, None, None, '"Paris"}')])
    merged = a.then(b)
    assert [(c.name, c.arguments) for c in merged.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert first.arguments == ""


def test_deltas_that_must_stay_apart_do_not_merge():
    live = OutputDelta("r", "a", [1], False)
    assert live.then(OutputDelta("r", "b", [2], False, index=1)) is None  # another sample
    assert OutputDelta("r", "a", [1], True, "length").then(live) is None  # after the end
    assert live.then(OutputDelta("r", "", [], True, error="boom")) is None  # an error stays its own
    assert live.then(OutputDelta("r", "b", [2], False, logprobs=[[(2, -1.0)]])) is None


async def test_a_slow_consumer_gets_every_token_in_fewer_outputs(engine):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = "The history of lighthouses"
    slow = []
    async for out in engine.generate(prompt, params):
        if not slow:
            await asyncio.sleep(2.0)  # the engine runs ahead meanwhile
        slow.append(out)
    fast = [out async for out in engine.generate(prompt, params)]
    assert max(len(o.outputs[0].token_ids) for o in slow) > 1 and slow[-1].finished and fast[-1].finished
    assert [t for o in slow for t in o.outputs[0].token_ids] == [t for o in fast for t in o.outputs[0].token_ids]
    assert "".join(o.outputs[0].text for o in slow) == "".join(o.outputs[0].text for o in fast)
    assert slow[-1].outputs[0].finish_reason == fast[-1].outputs[0].finish_reason == "length"
