"""``tristream batch``: line kinds, resuming after a torn write, ordering, interrupted runs of the real CLI, and
LLaMA-Factory's batch prediction."""

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
from tristream.datasets import prompt_length, read_samples, run_predict
from tristream.openai_api import RequestDefaults, with_system
from tristream.outputs import CompletionOutput, RequestMetrics, RequestOutput

BASE = SamplingParams(temperature=0, max_tokens=8, stop=["END"])
# The command's sampling options, which make BASE of what a line leaves out.
DEFAULTS = RequestDefaults({"temperature": 0, "max_tokens": 8, "stop": ["END"]})


def parse(raw: str, line: int):
    return parse_line(raw, line, DEFAULTS, ReversingEngine())


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
    job = parse('{"id": 7, "prompt": "Hello", "max_tokens": 3, "seed": null, "note": "ignored"}', 1)
    (call,) = job.calls
    assert (job.id, call.prompt, call.messages, job.openai, job.error) == (7, "Hello", None, False, None)
    assert call.params.max_tokens == 3 and call.params.stop == ["END"] and call.params.temperature == 0
    assert BASE.max_tokens == 8

    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]
    job = parse(json.dumps({"id": "c", "messages": [{"role": "user", "content": parts}]}), 2)
    (call,) = job.calls
    assert call.messages == [{"role": "user", "content": "Say hi."}] and call.prompt is None
    assert call.params == BASE

    line = {"id": "d", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2, "top_k": -1}
    (call,) = parse(json.dumps(line), 3).calls
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
    job = parse(json.dumps(line), 3)
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
    job = parse(json.dumps(line), 4)
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
        (
            '{"id": "a", "prompt": "x", "use_beam_search": true, "guided_regex": "a+"}',
            "a",
            False,
            "structured: beam search",
        ),
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
    job = parse(line, 5)
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
    """Answers a prompt with it upper-cased, in two deltas; later requests finish first. It refuses the prompts
    in ``refuse``, and keeps each prompt's parameters and each chat's messages, by their last text."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.config = SimpleNamespace(model="/models/stand-in", max_num_seqs=4)
        self.started = 0
        self.running = 0
        self.most_running = 0
        self.refuse = refuse
        self.params: dict[str, SamplingParams] = {}
        self.messages: dict[str, list[dict]] = {}

    async def start(self) -> None:
        pass

    def default_sampling_params(self, **fields) -> SamplingParams:
        return SamplingParams(**fields)

    async def generate(self, prompt, params=None, request_id=None, suffix=None):
        if not prompt:
            raise ValueError("the prompt is empty")
        async for out in self._answer(prompt, params, request_id):
            yield out

    async def chat(self, messages, params=None, request_id=None, chat_template_kwargs=None, **tools):
        self.messages[messages[-1]["content"]] = messages
        async for out in self._answer(messages[-1]["content"], params, request_id):
            yield out

    async def _answer(self, text, params, request_id):
        if text in self.refuse:
            raise ValueError(f"{text} is refused")
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
    summary = await run_batch(engine, DEFAULTS, str(src), str(out))
    assert (summary.done, summary.skipped, summary.errors, summary.tokens) == (5, 0, 3, 85)
    assert engine.most_running > 1 and engine.params["openai chat"].max_tokens == 5
    assert "batch: 5 done, 0 skipped, 3 errors, 85 output tokens" in capsys.readouterr().err

    records = read_records(out)
    assert [record_id(r) for r in records] == ["p1", 2, "c3", "c4", "empty", "line-6", "p7", "line-9"]
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
    assert records[5] == {"id": "line-6", "duplicate_id": "p1", "error": "line 6: duplicate id 'p1' (first on line 1)"}
    assert records[6]["choices"] == [
        {"text": "LAST PROMPT #0", "finish_reason": "length"},
        {"text": "LAST PROMPT #1", "finish_reason": "length"},
    ]
    assert records[7]["id"] == "line-9" and "not valid JSON" in records[7]["error"]

    full = out.read_bytes()
    again = await run_batch(ReversingEngine(), DEFAULTS, str(src), str(out))
    assert (again.done, again.skipped, again.errors) == (0, 8, 0) and out.read_bytes() == full

    kept = full.splitlines(keepends=True)[:4]
    out.write_bytes(b"".join(kept) + full.splitlines(keepends=True)[4][:9])
    resumed = await run_batch(ReversingEngine(), DEFAULTS, str(src), str(out))
    assert (resumed.done, resumed.skipped, resumed.errors) == (1, 4, 3)
    assert [stable(r) for r in read_records(out)] == [stable(r) for r in records]


def openai_line(custom_id: str, url: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


async def test_lines_take_openai_defaults_unless_the_command_gives_its_own(tmp_path):
    lines = [
        openai_line("a", "/v1/chat/completions", messages=[{"role": "user", "content": "two samples"}], n=2),
        openai_line("b", "/v1/completions", prompt="a completion"),
        {"id": "c", "messages": [{"role": "user", "content": "no system"}]},
        {"id": "d", "messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "own system"}]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    engine = ReversingEngine()
    await run_batch(engine, RequestDefaults({}, "Be brief."), str(src), str(tmp_path / "out.jsonl"))
    two, completion = engine.params["two samples"], engine.params["a completion"]
    assert (two.temperature, two.n, two.max_tokens) == (1.0, 2, None), "OpenAI's defaults, so n=2 samples two"
    assert (completion.temperature, completion.max_tokens) == (1.0, 16), "OpenAI's max_tokens of a completion"
    assert engine.messages["no system"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "no system"},
    ]
    assert engine.messages["own system"][0] == {"role": "system", "content": "Own."}
    assert len(engine.messages["own system"]) == 2

    engine = ReversingEngine()
    await run_batch(engine, RequestDefaults({"temperature": 0.0, "max_tokens": 5}), str(src), str(tmp_path / "o2"))
    two, completion = engine.params["two samples"], engine.params["a completion"]
    assert (two.temperature, two.max_tokens, completion.temperature, completion.max_tokens) == (0.0, 5, 0.0, 5)
    assert engine.messages["no system"] == [{"role": "user", "content": "no system"}]


async def test_retry_errors_runs_the_error_records_again(tmp_path, capsys):
    chat = [{"role": "user", "content": "openai"}]
    lines = [
        {"id": "p1", "prompt": "first"},
        {"id": "p2", "prompt": "flaky"},
        openai_line("c", "/v1/chat/completions", messages=chat),
        {"id": "p1", "prompt": "first again"},
        openai_line("c", "/v1/chat/completions", messages=chat),
        {"id": "p3", "prompt": "last"},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    first = await run_batch(ReversingEngine(refuse=("flaky",)), DEFAULTS, str(src), str(out))
    assert (first.done, first.errors) == (3, 3)
    records = read_records(out)
    assert [record_id(r) for r in records] == ["p1", "p2", "c", "line-4", "line-5", "p3"]
    assert records[1] == {"id": "p2", "error": "line 2: flaky is refused"}
    assert records[3] == {"id": "line-4", "duplicate_id": "p1", "error": "line 4: duplicate id 'p1' (first on line 1)"}
    assert (records[4]["custom_id"], records[4]["duplicate_id"], records[4]["response"]) == ("line-5", "c", None)
    assert records[4]["error"]["message"] == "line 5: duplicate id 'c' (first on line 3)"

    again = await run_batch(ReversingEngine(), DEFAULTS, str(src), str(out))
    assert (again.done, again.skipped, again.errors) == (0, 6, 0) and read_records(out) == records

    retried = await run_batch(ReversingEngine(), DEFAULTS, str(src), str(out), retry_errors=True)
    assert (retried.done, retried.skipped, retried.errors) == (1, 3, 2)
    after = read_records(out)
    assert [record_id(r) for r in after] == ["p1", "c", "p3", "p2", "line-4", "line-5"]
    assert after[3]["text"] == "FLAKY" and [after[0], after[1], after[2]] == [records[0], records[2], records[5]]
    assert "batch: 1 done, 3 skipped, 2 errors" in capsys.readouterr().err


async def test_a_missing_input_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.jsonl"):
        await run_batch(ReversingEngine(), DEFAULTS, str(tmp_path / "no-such.jsonl"), str(tmp_path / "out.jsonl"))


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


# ---------------------------------------------------------------- LLaMA-Factory batch prediction


def write_datasets(folder: Path) -> None:
    """An alpaca dataset with its own column names, and a sharegpt one with OpenAI-style tags and a broken row."""
    folder.mkdir()
    alpaca = [
        {"q": "What is the capital of France?", "ctx": "", "a": "Paris."},
        {"q": "Translate to French:", "ctx": "cat", "a": "chat", "sys": "You translate."},
        {"q": "Not read: past max_samples", "a": ""},
    ]
    (folder / "alpaca.json").write_text(json.dumps(alpaca))
    turns = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a color."), ("assistant", "Blue.")]
    chats = [
        {"messages": [{"role": r, "content": c} for r, c in turns]},
        {"messages": [{"role": "robot", "content": "?"}]},
    ]
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    info = {
        "alpaca_mine": {
            "file_name": "alpaca.json",
            "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"},
        },
        "chats": {
            "file_name": "chats.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))


def test_samples_of_alpaca_and_sharegpt_datasets(tmp_path):
    write_datasets(tmp_path / "data")
    samples = read_samples("alpaca_mine, chats", str(tmp_path / "data"), max_samples=2)
    assert [(s.messages, s.label) for s in samples[:3]] == [
        ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
        (
            [{"role": "system", "content": "You translate."}, {"role": "user", "content": "Translate to French:\ncat"}],
            "chat",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a color."},
            ],
            "Blue.",
        ),
    ]
    assert "dataset 'chats' sample 1" in samples[3].error and "'robot'" in samples[3].error and len(samples) == 4
    with pytest.raises(ValueError, match="dataset 'nope' is not in .*dataset_info.json .it has alpaca_mine, chats"):
        read_samples(["nope"], str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
        read_samples("chats", str(tmp_path))


@pytest.mark.parametrize("prompt, label, kept", [(100, 10, 40), (10, 100, 10), (60, 40, 30), (30, 5, 30), (0, 0, 0)])
def test_prompts_are_cut_as_llama_factory_cuts_them(prompt, label, kept):
    """cutoff_len 50: a short label keeps its room, a short prompt all of it, else they share in proportion."""
    assert prompt_length(prompt, label, 50) == kept


async def test_predictions_are_the_engines_answers(tmp_path, engine, tokenizer):
    write_datasets(tmp_path / "data")
    samples = read_samples("alpaca_mine,chats", str(tmp_path / "data"), max_samples=2)
    defaults = RequestDefaults({"temperature": 0.0, "max_tokens": 6}, "Be terse.")
    summary = await run_predict(engine, defaults, samples, str(tmp_path / "saves"))
    assert (summary.done, summary.errors, summary.skipped) == (3, 1, 0)
    path = tmp_path / "saves" / "generated_predictions.jsonl"
    records = read_records(path)
    assert [set(r) for r in records] == [{"prompt", "predict", "label"}] * 3 + [{"prompt", "predict", "label", "error"}]
    for sample, record in zip(samples[:3], records):
        messages = with_system(sample.messages, "Be terse.")
        assert record["prompt"] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        greedy = SamplingParams(temperature=0, max_tokens=6)
        assert record["predict"] == "".join([o.outputs[0].text async for o in engine.chat(messages, greedy)])
        assert record["label"] == sample.label
    assert records[1]["prompt"].count("system") == 1 and "You translate." in records[1]["prompt"]

    whole = path.read_bytes()
    path.write_bytes(whole[: whole.index(b"\n") + 10])
    resumed = await run_predict(engine, defaults, samples, str(tmp_path / "saves"))
    assert (resumed.done, resumed.skipped) == (2, 1) and read_records(path) == records

    cut = await run_predict(engine, defaults, samples[:1], str(tmp_path / "cut"), cutoff_len=12)
    assert cut.done == 1
    text = tokenizer.apply_chat_template(
        with_system(samples[0].messages, "Be terse."), tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    kept = prompt_length(len(ids), len(tokenizer.encode("Paris.", add_special_tokens=False)), 12)
    assert read_records(tmp_path / "cut" / "generated_predictions.jsonl")[0]["prompt"] == tokenizer.decode(ids[:kept])


PREDICT_YAML = """\
stage: sft
do_predict: true
finetuning_type: lora
template: chatml
eval_dataset: alpaca_mine
dataset_dir: {data}
max_samples: 2
cutoff_len: 1024
max_new_tokens: 4
do_sample: false
per_device_eval_batch_size: 1
predict_with_generate: true
output_dir: {out}
"""


def test_a_llama_factory_prediction_yaml_runs(tmp_path):
    write_datasets(tmp_path / "data")
    config = tmp_path / "predict.yaml"
    config.write_text(PREDICT_YAML.format(data=tmp_path / "data", out=tmp_path / "saves"))
    done = subprocess.run(
        [sys.executable, "-m", "tristream", "batch", str(config), "--max-model-len", "1024"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    for key in ("stage", "finetuning_type", "per_device_eval_batch_size", "predict_with_generate"):
        assert f"{key} is ignored" in done.stderr
    assert "batch: 2 done, 0 skipped, 0 errors" in done.stderr
    records = read_records(tmp_path / "saves" / "generated_predictions.jsonl")
    assert [r["label"] for r in records] == ["Paris.", "chat"]
    assert records[0]["prompt"].startswith("<|im_start|>user\nWhat is the capital of France?")
    assert all(r["predict"] for r in records)
