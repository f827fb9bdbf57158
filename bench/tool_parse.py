"""Tool-call parsing cost per streamed token in the tokenizer process, against detokenizing the same token.

Each of ``--batch`` streams is a Hermes-format reply (a sentence, then ``--calls`` ``<tool_call>`` blocks)
in the bundled tokenizer's tokens, fed one token per step, every stream at its own offset. A step is timed
as detokenization alone (``push_step``), then as detokenization plus one ``ToolCallParser.push`` per
stream. The parsed calls are checked against the reply's. Figures are medians over ``--repeats`` runs.

    python bench/tool_parse.py --batch 256 --calls 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from transformers import AutoTokenizer

from tristream.bench.report import RESULTS, header, now, write_report
from tristream.model_files import resolve_model
from tristream.outputs import merge_tool_calls
from tristream.tokenizer_proc.detokenizer import IncrementalDetokenizer, push_step
from tristream.tokenizer_proc.tool_calls import FORMATS, ToolCallParser

CITIES = ["Paris", "São Paulo", "Reykjavík", "Kyoto", "Nairobi", "Ushuaia", "Tromsø", "Ho Chi Minh City"]


def reply(i: int, calls: int) -> tuple[str, list[tuple[str, str]]]:
    """Stream ``i``'s reply text and the (name, arguments) of its calls."""
    expected = []
    text = "Let me check the weather and the local time for you before we plan the trip."
    for k in range(calls):
        city = CITIES[(i + k) % len(CITIES)]
        arguments = json.dumps({"city": city, "unit": "celsius", "days": 3, "details": ["wind", "rain"]})
        expected.append(("get_weather", arguments))
        text += f'\n<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    return text, expected


def run(tokenizer, prompt: list[int], streams: list[list[int]], parse: bool) -> tuple[float, list]:
    """Mean seconds per step over fresh detokenizers (and parsers), one token per stream per step, and the calls."""
    detoks = [IncrementalDetokenizer(tokenizer, prompt) for _ in streams]
    parsers = [ToolCallParser(FORMATS["hermes"]) for _ in streams]
    calls: list[list] = [[] for _ in streams]
    steps = max(map(len, streams))
    start = time.perf_counter()
    for k in range(steps):
        texts = push_step(detoks, [ids[k : k + 1] for ids in streams])
        if parse:
            for j, (parser, text) in enumerate(zip(parsers, texts)):
                _, deltas = parser.push(text, finished=k == len(streams[j]) - 1)
                calls[j] = merge_tool_calls(calls[j], deltas) if deltas else calls[j]
    return (time.perf_counter() - start) / steps, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "tool_parse.json"))
    args = parser.parse_args()
    started, load_before = now(), os.getloadavg()

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    replies = [reply(i, args.calls) for i in range(args.batch)]
    streams = [tokenizer.encode(text) for text, _ in replies]
    steps = min(map(len, streams))
    streams = [ids[:steps] for ids in streams]
    runs: dict[str, list[float]] = {"detokenize": [], "detokenize_and_parse": []}
    for _ in range(args.repeats):
        runs["detokenize"].append(run(tokenizer, prompt, streams, parse=False)[0])
        seconds, calls = run(tokenizer, prompt, streams, parse=True)
        runs["detokenize_and_parse"].append(seconds)
    whole = [tokenizer.decode(ids) for ids in streams]
    for got, text in zip(calls, whole):
        truth = merge_tool_calls([], ToolCallParser(FORMATS["hermes"]).push(text, finished=True)[1])
        assert [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in truth], "streamed != whole"
    step = {name: statistics.median(times) for name, times in runs.items()}
    parse_s = step["detokenize_and_parse"] - step["detokenize"]

    report = {
        **header("tool_parse", started),
        "tokenizer": "SmolLM2-135M-Instruct (bundled), byte-level BPE",
        "settings": {"batch": args.batch, "calls_per_reply": args.calls, "steps": steps, "repeats": args.repeats},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "step_s": step,
        "runs_step_s": runs,
        "parse_vs_detokenize": parse_s / step["detokenize"],
        "parse_share_of_step": parse_s / step["detokenize_and_parse"],
    }
    for name, seconds in step.items():
        print(f"{name:24s} {seconds * 1e3:8.3f} ms/step ({seconds / args.batch * 1e6:6.2f} us/token)")
    print(f"parsing costs {report['parse_vs_detokenize']:.2f}x detokenizing the same token")
    write_report(report, "tool_parse", None, args.out)


if __name__ == "__main__":
    main()
