"""``tristream batch``: line kinds, resuming after a torn write, ordering, and interrupted runs of the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tristream import SamplingParams, StructuredOutput
from tristream.batch import load_written, parse_line, run_batch
from tristream.outputs import CompletionOutput, RequestMetrics, RequestOutput

BASE = SamplingParams(temperature=0, max_tokens=8, stop=["END"])


def stable(record: dict) -> dict:
    """A record without the parts that differ between runs: generated ids and timestamps."""
    if "custom_id" not in record:
        return record
    record = {**record, "id": None}
    if record["response"] is not None:
        body = {**record["response"]["body"], "id": None, "created": None}
        record["response"] = {**record["response"], "request_id": None, "body": body}
    return record


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def record_id(record: dict) -> str | int:
    return record["custom_id"] if "custom_id" in record else record["id"]


# ---------------------------------------------------------------- parsing lines


def test_prompt_and_messages_lines_with_overrides():
    job = parse_line('{"id": 7, "prompt": "Hello", "max_tokens": 3, "seed": null, "note": "ignored"}', 1, BASE)
    (call,) = job.calls
    assert (job.id, call.prompt, call.messages, job.openai, job.error) == (7, "Hello", None, False, None)
    assert call.params.max_tokens == 3 and call.params.stop == ["END"] and call.params.temperature == 0
    assert BASE.max_tokens == 8

    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]
    job = parse_line(json.dumps({"id": "c", "messages": [{"role": "user", "content": parts}]}), 2, BASE)
    (call,) = job.calls
    assert call.messages == [{"role": "user", "content": "Say hi."}] and call.prompt is None
    assert call.params == BASE

    line = {"id": "d", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2, "top_k": -1}
    (call,) = parse_line(json.dumps(line), 3, BASE).calls
    assert (call.params.max_tokens, call.params.top_k) == (2, 0), (
        "the fields of the chat body, as the server reads them"
    )


def test_openai_batch_lines_take_their_sampling_fields_from_the_body():
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 11,
        "stop": "\n",
        "n": 2,
        "user": "u1",
        "logprobs": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    }
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body}
    job = parse_line(json.dumps(line), 3, BASE)
    assert job.error is None and job.openai and job.id == "r1" and job.body.model == "gpt-4o-mini"
    (call,) = job.calls
    assert call.messages == body["messages"]
    p = call.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.n, p.logprobs) == (5, 0.5, 0.9, 11, ["\n"], 2, None)
    assert p.structured == StructuredOutput(json={"type": "object"})

    line = {
        "custom_id": "r2",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "m", "prompt": "Once", "max_tokens": 4, "response_format": {"type": "json_object"}},
    }
    job = parse_line(json.dumps(line), 4, BASE)
    (call,) = job.calls
    assert (call.prompt, call.messages, call.params.max_tokens) == ("Once", None, 4)
    assert call.params.structured == StructuredOutput(json_object=True)


@pytest.mark.parametrize(
    "line, ident, openai, reason",
    [
        ('{"id": "a", "prompt": "x"', "line-5", False, "not valid JSON"),
        ('["id", "prompt"]', "line-5", False, "not a JSON object"),
        ('{"prompt": "x"}', "line-5", False, "id must be"),
        ('{"id": true, "prompt": "x"}', "line-5", False, "id must be"),
        ('{"id": "a"}', "a", False, "either prompt or messages"),
        ('{"id": "a", "prompt": "x", "messages": []}', "a", False, "either prompt or messages"),
        ('{"id": "a", "prompt": "x", "temperature": -1}', "a", False, "temperature must be >= 0"),
        ('{"id": "a", "prompt": "x", "temperature": NaN}', "a", False, "temperature: Input should be a finite number"),
        (
            '{"id": "a", "prompt": "x", "logit_bias": {"5": 1e999}}',
            "a",
            False,
            "logit_bias.5: Input should be a finite",
        ),
        ('{"id": "a", "prompt": ["x", "y"]}', "a", False, "one prompt per line"),
        ('{"id": "a", "prompt": "x", "use_beam_search": true}', "a", False, "use_beam_search is not supported"),
        ('{"id": "a", "messages": "hi"}', "a", False, "messages must be a non-empty list"),
        ('{"id": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "a", False, "only text"),
        (
            '{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}',
            "b",
            True,
            "url must be",
        ),
        ('{"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}', "b", True, "POST"),
        ('{"custom_id": "b", "url": "/v1/chat/completions", "body": {"prompt": "x"}}', "b", True, "needs messages"),
        ('{"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 2}}', "b", True, "top_p"),
        ('{"url": "/v1/completions", "body": {"prompt": "x"}}', "line-5", True, "custom_id must be"),
        ('{"id": "a", "url": "https://example.com", "method": "GET"}', "a", False, "either prompt or messages"),
    ],
)
def test_malformed_lines_become_errors_naming_the_line(line, ident, openai, reason):
    job = parse_line(line, 5, BASE)
    assert (job.id, job.openai) == (ident, openai)
    assert job.error.startswith("line 5: ") and reason in job.error


# ---------------------------------------------------------------- reading the output back


def test_a_torn_last_line_is_cut_off_and_counts_as_not_written(tmp_path):
    out = tmp_path / "out.jsonl"
    assert load_written(str(out)) == {}
    whole = (
        b'{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n'
        b'{"id": "batch_req_x", "custom_id": "c", "response": null, "error": {"message": "m"}}\n\n'
    )
    out.write_bytes(whole + b'{"id": 2, "text": "cut sh')
    assert load_written(str(out)) == {"1": 1, '"1"': 1, '"c"': 1}
    assert out.read_bytes() == whole
    out.write_bytes(whole + b'{"id": 2, "text": "whole but no newline"}')
    assert load_written(str(out)) == {"1": 1, '"1"': 1, '"c"': 1} and out.read_bytes() == whole
    out.write_bytes(whole + b"not a record\n")
    with pytest.raises(ValueError, match="line 5 is not a batch result"):
        load_written(str(out))


# ---------------------------------------------------------------- run_batch on a stand-in engine


class ReversingEngine:
    """Answers a prompt with it upper-cased, in two deltas; later requests finish first."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(model="/models/stand-in", max_num_seqs=4)
        self.started = 0
        self.running = 0
        self.most_running = 0
        self.params: dict[str, SamplingParams] = {}

    async def start(self) -> None:
        pass

    async def generate(self, prompt, params=None, request_id=None):
        if not prompt:
            raise ValueError("the prompt is empty")
        async for out in self._answer(prompt, params, request_id):
            yield out

    async def chat(self, messages, params=None, request_id=None, chat_template_kwargs=None):
        async for out in self._answer(messages[-1]["content"], params, request_id):
            yield out

    async def _answer(self, text, params, request_id):
        self.started += 1
        self.params[text] = params
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0.2 / self.started)
            for half, reason in ((0, None), (1, "length")):
                outputs = []
                for i in range(params.n):
                    answer = text.upper() + (f" #{i}" if params.n > 1 else "")
                    cut = len(answer) // 2
                    piece = answer[:cut] if half == 0 else answer[cut:]
                    outputs.append(CompletionOutput(i, piece, [ord(c) for c in piece], reason))
                yield RequestOutput(
                    request_id,
                    text,
                    [1, 2, 3],
                    outputs,
                    finished=half == 1,
                    metrics=RequestMetrics(arrival_time=time.time()),
                )
        finally:
            self.running -= 1


async def test_run_batch_writes_in_input_order_and_resumes(tmp_path, capsys):
    lines = [
        {"id": "p1", "prompt": "first prompt"},
        {"id": 2, "messages": [{"role": "user", "content": "a chat"}]},
        {
            "custom_id": "c3",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "asked",
                "messages": [{"role": "user", "content": "openai chat"}],
                "n": 2,
                "max_completion_tokens": 5,
            },
        },
        {"custom_id": "c4", "method": "POST", "url": "/v1/completions", "body": {"prompt": "openai text"}},
        {"id": "empty", "prompt": ""},
        {"id": "p1", "prompt": "the same id again"},
        {"id": "p7", "prompt": "last prompt", "n": 2},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\nnot json\n")
    out = tmp_path / "out.jsonl"
    engine = ReversingEngine()
    summary = await run_batch(engine, BASE, str(src), str(out))
    assert (summary.done, summary.skipped, summary.errors, summary.tokens) == (5, 0, 3, 85)
    assert engine.most_running > 1 and engine.params["openai chat"].max_tokens == 5
    assert "batch: 5 done, 0 skipped, 3 errors, 85 output tokens" in capsys.readouterr().err

    records = read_records(out)
    assert [record_id(r) for r in records] == ["p1", 2, "c3", "c4", "empty", "p1", "p7", "line-9"]
    assert records[0] == {
        "id": "p1",
        "text": "FIRST PROMPT",
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 12,
    }
    assert records[1]["text"] == "A CHAT"
    chat = records[2]
    assert chat["id"].startswith("batch_req_") and chat["error"] is None
    assert chat["response"]["status_code"] == 200 and chat["response"]["request_id"] in chat["id"]
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "asked" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": i,
            "message": {"role": "assistant", "content": f"OPENAI CHAT #{i}"},
            "logprobs": None,
            "finish_reason": "length",
        }
        for i in range(2)
    ]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 28,
        "total_tokens": 31,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    body = records[3]["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == "stand-in"
    assert body["choices"] == [{"index": 0, "text": "OPENAI TEXT", "logprobs": None, "finish_reason": "length"}]
    assert records[4] == {"id": "empty", "error": "line 5: the prompt is empty"}
    assert records[5] == {"id": "p1", "error": "line 6: duplicate id 'p1' (first on line 1)"}
    assert records[6]["choices"] == [
        {"text": "LAST PROMPT #0", "finish_reason": "length"},
        {"text": "LAST PROMPT #1", "finish_reason": "length"},
    ]
    assert records[7]["id"] == "line-9" and "not valid JSON" in records[7]["error"]

    full = out.read_bytes()
    again = await run_batch(ReversingEngine(), BASE, str(src), str(out))
    assert (again.done, again.skipped, again.errors) == (0, 8, 0) and out.read_bytes() == full

    kept = full.splitlines(keepends=True)[:4]
    out.write_bytes(b"".join(kept) + full.splitlines(keepends=True)[4][:9])
    resumed = await run_batch(ReversingEngine(), BASE, str(src), str(out))
    assert (resumed.done, resumed.skipped, resumed.errors) == (1, 4, 3)
    assert [stable(r) for r in read_records(out)] == [stable(r) for r in records]


async def test_a_missing_input_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.jsonl"):
        await run_batch(ReversingEngine(), BASE, str(tmp_path / "no-such.jsonl"), str(tmp_path / "out.jsonl"))


# ---------------------------------------------------------------- the CLI on the bundled model, interrupted

TOPICS = [
    "the sea",
    "a red fox",
    "autumn rain",
    "the moon",
    "a lighthouse",
    "bread",
    "mountains",
    "a library",
    "snow",
    "a train",
    "coffee",
    "the desert",
    "a violin",
    "tides",
    "a garden",
    "thunder",
    "an old map",
    "bees",
    "a bridge",
    "the stars",
]
BROKEN = 7


def batch_input() -> tuple[str, list[str | int]]:
    """20 lines: prompts, conversations, two OpenAI batch requests and one line that is not JSON."""
    lines, ids = [], []
    for n, topic in enumerate(TOPICS, 1):
        if n == BROKEN:
            lines.append('{"id": "broken", "prompt": "no closing brace"')
            ids.append(f"line-{n}")
            continue
        if n == 4:
            line = {
                "custom_id": "req-4",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "smol",
                    "messages": [{"role": "user", "content": f"Describe {topic}."}],
                    "max_completion_tokens": 5,
                    "temperature": 0,
                },
            }
        elif n == 13:
            line = {
                "custom_id": "req-13",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "smol", "prompt": f"A short story about {topic}:", "max_tokens": 8},
            }
        elif n % 2:
            line = {"id": f"p{n}", "prompt": f"Some facts about {topic}:"}
        else:
            line = {"id": n, "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}]}
        lines.append(json.dumps(line))
        ids.append(record_id(line))
    return "\n".join(lines) + "\n", ids


# One request at a time and no prefix cache: every run computes each request alike, and a run can be
# stopped part-way. One torch thread: on a small machine shared with other work, more are much slower.
FLAGS = [
    "--temperature",
    "0",
    "--max-tokens",
    "8",
    "--max-model-len",
    "1024",
    "--max-num-seqs",
    "1",
    "--no-enable-prefix-caching",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_to_end(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tristream", "batch", "--input", str(src), "--output", str(out), *FLAGS],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def start_batch(src: Path, out: Path, err: Path) -> subprocess.Popen:
    with open(err, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "tristream", "batch", "--input", str(src), "--output", str(out), *FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=ENV,
            # A shell that starts jobs in the background hands them SIGINT ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


def interrupt(proc: subprocess.Popen, out: Path, at_lines: int, sig: signal.Signals, alive) -> int:
    """Send ``sig`` once ``out`` has ``at_lines`` lines; the exit status, after checking no child outlives it."""
    try:
        while not out.exists() or out.read_bytes().count(b"\n") < at_lines:
            assert proc.poll() is None, "the batch ended before it was interrupted"
            time.sleep(0.02)
        kids = children(proc.pid)
        assert len(kids) >= 3
        proc.send_signal(sig)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [k for k in kids if alive(k)] == []
    return rc


def test_interrupted_runs_resume_to_the_same_result_as_one_run(tmp_path, alive):
    text, ids = batch_input()
    src = tmp_path / "in.jsonl"
    src.write_text(text)

    ref = tmp_path / "ref.jsonl"
    done = run_to_end(src, ref)
    assert done.returncode == 0, done.stderr
    reference = read_records(ref)
    assert [record_id(r) for r in reference] == ids
    for r in reference:
        if r is reference[BROKEN - 1]:
            assert r["error"].startswith(f"line {BROKEN}: not valid JSON") and "text" not in r
        elif "custom_id" in r:
            assert r["error"] is None and r["response"]["status_code"] == 200
        else:
            assert isinstance(r["text"], str) and r["finish_reason"] in ("stop", "length") and "error" not in r
    chat = reference[3]["response"]["body"]
    assert isinstance(chat["choices"][0]["message"]["content"], str) and chat["usage"]["completion_tokens"] <= 5

    out = tmp_path / "out.jsonl"
    proc = start_batch(src, out, tmp_path / "err1.txt")
    assert interrupt(proc, out, 5, signal.SIGTERM, alive) == 128 + signal.SIGTERM
    err = (tmp_path / "err1.txt").read_text()
    assert "stopped early" in err and "Traceback" not in err
    first = out.read_bytes()
    assert first.endswith(b"\n") and 5 <= first.count(b"\n") < 20
    # What a kill in the middle of writing the next line leaves behind:
    torn = ref.read_bytes().splitlines(keepends=True)[first.count(b"\n")]
    out.write_bytes(first + torn[: len(torn) // 2])

    proc = start_batch(src, out, tmp_path / "err2.txt")
    assert interrupt(proc, out, first.count(b"\n") + 3, signal.SIGINT, alive) == 130
    assert "Traceback" not in (tmp_path / "err2.txt").read_text()
    second = out.read_bytes()
    assert second.startswith(first) and second.endswith(b"\n")

    last = run_to_end(src, out)
    assert last.returncode == 0, last.stderr
    lines_before = second.count(b"\n")
    assert f"{lines_before} skipped" in last.stderr
    assert [stable(r) for r in read_records(out)] == [stable(r) for r in reference]
