"""``tristream batch``: run a JSONL file of requests into a JSONL file of results, resumably.

Input lines are ``{"id", "prompt"}``, ``{"id", "messages"}`` or OpenAI batch-API
requests (``{"custom_id", "method", "url", "body"}``). Results are appended to the
output in input order, one flushed line each; a later run skips the ids already
there, so an interrupted job picks up where it stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import TypeVar

from tqdm.auto import tqdm
from tristream.engine import AsyncEngine
from tristream.model_files import model_name
from tristream.outputs import CompletionOutput, RequestOutput, accumulate
from tristream.sampling_params import SamplingParams, StructuredOutput

T = TypeVar("T")

OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
# Fields a line may set, by SamplingParams' own names; logprobs have no place in the records.
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"logprobs", "prompt_logprobs"}
MIN_IN_FLIGHT = 256


@dataclasses.dataclass
class BatchSummary:
    """One run: records written with a result (``done``) and with an error, input
    records already in the output (``skipped``), output tokens, and wall time."""

    done: int = 0
    skipped: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class Job:
    """One input line: a request to run, or, with ``error`` set, the reason it cannot run."""

    line: int
    id: str | int
    openai: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    params: SamplingParams | None = None
    model: str | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        """The id as JSON text, so that ``1`` and ``"1"`` stay apart."""
        return json.dumps(self.id)


def parse_line(raw: str | bytes, line: int, base: SamplingParams) -> Job:
    """Parse input line number ``line``; sampling fields on it override ``base``.

    A line without a usable id gets the id ``"line-<line>"``.
    """
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return Job(line, f"line-{line}", error=f"line {line}: not valid JSON ({e})")
    if not isinstance(obj, dict):
        return Job(line, f"line-{line}", error=f"line {line}: not a JSON object")
    openai = "custom_id" in obj or "body" in obj
    id_field = "custom_id" if openai else "id"
    ident = obj.get(id_field)
    if not (isinstance(ident, str) and ident or isinstance(ident, int) and not isinstance(ident, bool)):
        return Job(
            line, f"line-{line}", openai, error=f"line {line}: {id_field} must be a non-empty string or an integer"
        )
    job = Job(line, ident, openai)
    try:
        if openai:
            fields, kind = _openai_body(obj)
        elif ("prompt" in obj) == ("messages" in obj):
            raise ValueError("give either prompt or messages")
        else:
            fields, kind = obj, "messages" if "messages" in obj else "prompt"
        if kind == "messages":
            job.messages = _messages(fields["messages"])
        else:
            job.prompt = fields["prompt"]
        job.params = _sampling(base, fields)
        if openai and isinstance(fields.get("model"), str):
            job.model = fields["model"]
    except ValueError as e:
        job.error = f"line {line}: {e}"
    return job


def _openai_body(obj: dict) -> tuple[dict, str]:
    """The body of an OpenAI batch line, and which of messages or prompt it holds."""
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"method must be POST, got {obj['method']!r}")
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise ValueError(f"url must be one of {', '.join(OPENAI_URLS)}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    kind = "messages" if url == "/v1/chat/completions" else "prompt"
    if kind not in body:
        raise ValueError(f"the body of a {url} request needs {kind}")
    return body, kind


def _messages(messages: object) -> list[dict]:
    """Check the shape and join the text parts of list contents into one string."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a non-empty list of objects")
    flat = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ValueError("only text content parts are supported")
            m = {**m, "content": "".join(p["text"] for p in content)}
        flat.append(m)
    return flat


def _sampling(base: SamplingParams, fields: dict) -> SamplingParams:
    """``base`` with the SamplingParams fields of ``fields``; null values keep the base."""
    overrides = {k: v for k, v in fields.items() if k in SAMPLING_FIELDS and v is not None}
    if fields.get("max_completion_tokens") is not None:
        overrides["max_tokens"] = fields["max_completion_tokens"]
    if fields.get("response_format") is not None:
        structured = _response_format(fields["response_format"])
        if structured is not None:
            overrides["structured"] = structured
    return dataclasses.replace(base, **overrides)


def _response_format(fmt: object) -> StructuredOutput | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        return StructuredOutput(json=fmt["json_schema"]["schema"])
    raise ValueError(f"unsupported response_format {fmt!r}")


def load_written(output_path: str) -> Counter[str]:
    """How many records each id (as JSON text) has in ``output_path``; empty if it does not exist.

    A last line without its newline is what an interrupted write left: it is cut
    off, so its record runs again.
    """
    written: Counter[str] = Counter()
    if not os.path.exists(output_path):
        return written
    with open(output_path, "r+b") as f:
        offset = 0
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                f.truncate(offset)
                break
            offset += len(line)
            if line.strip():
                written[_record_key(line, output_path, n)] += 1
    return written


def _record_key(line: bytes, path: str, n: int) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    ident = (record["custom_id"] if "custom_id" in record else record.get("id")) if isinstance(record, dict) else None
    if ident is None:
        raise ValueError(f"{path} line {n} is not a batch result; give another --output")
    return json.dumps(ident)


def _plan(input_path: str, base: SamplingParams, written: Counter[str]) -> Iterator[tuple[Job, bool]]:
    """Every input record, and whether the output has it already.

    The k-th record of an id counts as written when the output holds at least k
    records of that id; a repeated id in the input is an error record of its own.
    """
    seen: dict[str, int] = {}
    counts: Counter[str] = Counter()
    with open(input_path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            job = parse_line(raw, n, base)
            first = seen.setdefault(job.key, n)
            if first != n and job.error is None:
                job.error = f"line {n}: duplicate id {job.id!r} (first on line {first})"
            yield job, counts[job.key] < written[job.key]
            counts[job.key] += 1


async def _run_job(engine: AsyncEngine, job: Job, model: str, adapters: Collection[str]) -> tuple[dict, int]:
    """The record of one job and its output tokens; an engine ValueError becomes an error record.

    A job whose ``model`` is one of ``adapters`` runs through that LoRA adapter.
    """
    if job.error is not None:
        return _error_record(job), 0
    request_id = uuid.uuid4().hex
    params = dataclasses.replace(job.params, lora=job.model) if job.model in adapters else job.params
    if job.messages is not None:
        stream = engine.chat(job.messages, params, request_id=request_id)
    else:
        stream = engine.generate(job.prompt, params, request_id=request_id)
    final = None
    try:
        async for out in stream:
            final = accumulate(final, out)
    except ValueError as e:
        return _error_record(dataclasses.replace(job, error=f"line {job.line}: {e}")), 0
    tokens = sum(len(o.token_ids) for o in final.outputs)
    return _result_record(job, final, job.model or model, request_id, tokens), tokens


def _error_record(job: Job) -> dict:
    if job.openai:
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": job.id,
            "response": None,
            "error": {"code": "invalid_request", "message": job.error},
        }
    return {"id": job.id, "error": job.error}


def _choice(o: CompletionOutput) -> dict:
    choice = {"text": o.text, "finish_reason": o.finish_reason}
    if o.reasoning_content is not None:
        choice["reasoning_content"] = o.reasoning_content
    return choice


def _result_record(job: Job, out: RequestOutput, model: str, request_id: str, tokens: int) -> dict:
    usage = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": tokens}
    if not job.openai:
        record: dict = {"id": job.id}
        if len(out.outputs) == 1:
            record.update(_choice(out.outputs[0]))
        else:
            record["choices"] = [_choice(o) for o in out.outputs]
        return {**record, **usage}
    chat = job.messages is not None
    choices = []
    for o in out.outputs:
        if chat:
            message = {"role": "assistant", "content": o.text}
            if o.reasoning_content is not None:
                message["reasoning_content"] = o.reasoning_content
            choices.append({"index": o.index, "message": message, "logprobs": None, "finish_reason": o.finish_reason})
        else:
            choices.append({"index": o.index, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason})
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {**usage, "total_tokens": usage["prompt_tokens"] + tokens},
    }
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": job.id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


async def _run_in_order(work: Iterator[Awaitable[T]], window: int, emit: Callable[[T], None]) -> None:
    """Run up to ``window`` awaitables at once; emit each result once all before it are emitted."""
    queue: deque[asyncio.Future] = deque()
    running: set[asyncio.Future] = set()

    def emit_ready() -> None:
        while queue and queue[0].done():
            emit(queue.popleft().result())

    try:
        for item in work:
            while len(running) >= window:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                emit_ready()
            task = asyncio.ensure_future(item)
            running.add(task)
            task.add_done_callback(running.discard)
            queue.append(task)
        while queue:
            await asyncio.wait([queue[0]])
            emit_ready()
    finally:
        for task in queue:
            task.cancel()
        await asyncio.gather(*queue, return_exceptions=True)


def check_paths(input_path: str, output_path: str) -> None:
    """Raise unless the input exists and the output is another file."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"no such input file: {input_path}")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise ValueError("the input and the output are the same file")


async def run_batch(
    engine: AsyncEngine, params: SamplingParams, input_path: str, output_path: str, adapters: Collection[str] = ()
) -> BatchSummary:
    """Run every request of ``input_path`` that ``output_path`` lacks, appending results in input order.

    ``params`` is the base that sampling fields on a line override; an OpenAI
    line whose ``model`` is one of the LoRA ``adapters`` runs through it. A line that
    cannot run is written as an error record and the job goes on. Shows a
    progress bar and prints a summary line to stderr. While it runs in the main
    thread, SIGTERM stops it cleanly and exits with status 143.
    """
    check_paths(input_path, output_path)
    written = load_written(output_path)
    summary = BatchSummary()
    todo = 0
    for _, skip in _plan(input_path, params, written):
        summary.skipped += skip
        todo += not skip
    await engine.start()
    model = model_name(engine.config.model)
    window = max(MIN_IN_FLIGHT, 2 * engine.config.max_num_seqs)

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        main_task.cancel()

    own_sigterm = (
        threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if own_sigterm:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    start = time.perf_counter()
    bar = tqdm(total=todo, desc="Batch", unit="req")
    finished = False
    try:
        with open(output_path, "ab") as out:

            def emit(result: tuple[dict, int]) -> None:
                record, tokens = result
                out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
                out.flush()
                if record.get("error") is None:
                    summary.done += 1
                else:
                    summary.errors += 1
                summary.tokens += tokens
                bar.set_postfix_str(f"{summary.tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
                bar.update(1)

            work = (
                _run_job(engine, job, model, adapters) for job, skip in _plan(input_path, params, written) if not skip
            )
            await _run_in_order(work, window, emit)
            finished = True
    except asyncio.CancelledError:
        if terminated:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        if own_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)
        bar.close()
        summary.seconds = time.perf_counter() - start
        print(
            f"batch: {summary.done} done, {summary.skipped} skipped, {summary.errors} errors, {summary.tokens} output "
            f"tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tok/s)"
            + ("" if finished else "; stopped early, run it again to resume"),
            file=sys.stderr,
        )
    return summary
