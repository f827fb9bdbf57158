"""``tristream batch``: run a JSONL file of requests into a JSONL file of results, resumably.

Input lines are ``{"id", "prompt"}``, ``{"id", "messages"}`` or OpenAI batch-API
requests (``{"custom_id", "method", "url", "body"}``). A line's sampling fields are
read as the server reads the body of ``/v1/completions`` (a prompt) or
``/v1/chat/completions`` (messages), with the command's sampling options as the
server's defaults. Results are appended to the output in input order, one flushed
line each; a later run skips the ids already there, so an interrupted job picks up
where it stopped (and with ``retry_errors`` runs the error records again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from typing import TypeVar

from pydantic import ValidationError
from tqdm.auto import tqdm

from tristream.engine import AsyncEngine
from tristream.model_files import model_name
from tristream.openai_api import (
    ROUTES,
    ChatCompletionRequest,
    CompletionRequest,
    EngineCall,
    RequestDefaults,
    validation_message,
)
from tristream.outputs import CompletionOutput, RequestOutput, fold
from tristream.streams import merge

T = TypeVar("T")

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

    def add(self, record: dict, tokens: int) -> None:
        """Count one written record and its output tokens."""
        if record.get("error") is None:
            self.done += 1
        else:
            self.errors += 1
        self.tokens += tokens


@dataclasses.dataclass
class Job:
    """One input line: its OpenAI body and engine requests, or, with ``error`` set, the reason it cannot run.

    A line that repeats an earlier line's id is an error recorded as ``"line-<line>"``, with ``duplicate_id``.
    """

    line: int
    id: str | int
    openai: bool = False
    body: ChatCompletionRequest | CompletionRequest | None = None
    calls: list[EngineCall] = dataclasses.field(default_factory=list)
    error: str | None = None
    duplicate_id: str | int | None = None

    @property
    def key(self) -> str:
        """The id as JSON text, so that ``1`` and ``"1"`` stay apart."""
        return json.dumps(self.id)


def parse_line(raw: str | bytes, line: int, defaults: RequestDefaults, engine: AsyncEngine) -> Job:
    """Parse input line number ``line``; what it leaves out takes ``defaults``, as in the server of ``engine``.

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
        request, fields = _openai_body(obj) if openai else _simple_body(obj)
        job.body = request.model_validate(fields)
        job.calls = defaults.calls(job.body, engine)
        if not openai and len(job.calls) != 1:
            raise ValueError("give one prompt per line")
        params = dataclasses.replace(job.calls[0].params, logprobs=None, prompt_logprobs=None)
        for call in job.calls:
            call.params = params
    except ValidationError as e:
        job.error = f"line {line}: {validation_message(e.errors())[0]}"
    except ValueError as e:
        job.error = f"line {line}: {e}"
    return job


def _simple_body(obj: dict) -> tuple[type[ChatCompletionRequest | CompletionRequest], dict]:
    """A ``{"id", "prompt"}`` or ``{"id", "messages"}`` line, read as the OpenAI body of its kind."""
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("give either prompt or messages")
    return (ChatCompletionRequest if "messages" in obj else CompletionRequest), obj


def _openai_body(obj: dict) -> tuple[type[ChatCompletionRequest | CompletionRequest], dict]:
    """The request model and the body of an OpenAI batch line."""
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"method must be POST, got {obj['method']!r}")
    url = obj.get("url")
    request = ROUTES.get(url) if isinstance(url, str) else None
    if request is None:
        raise ValueError(f"url must be one of {', '.join(ROUTES)}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    kind = "messages" if request is ChatCompletionRequest else "prompt"
    if kind not in body:
        raise ValueError(f"the body of a {url} request needs {kind}")
    return request, body


def complete_lines(path: str) -> list[bytes]:
    """The lines of ``path`` (none if it does not exist), each with its newline.

    A last line without its newline is what an interrupted write left: it is cut off.
    """
    if not os.path.exists(path):
        return []
    with open(path, "r+b") as f:
        lines = f.readlines()
        if lines and not lines[-1].endswith(b"\n"):
            f.truncate(f.tell() - len(lines.pop()))
    return lines


def load_written(output_path: str, retry_errors: bool = False) -> Counter[str]:
    """How many records each id (as JSON text) has in ``output_path``; empty if it does not exist.

    A torn last line is cut off, so its record runs again; with ``retry_errors`` so are the error records.
    """
    lines = complete_lines(output_path)
    records = [(line, _record(line, output_path, n)) for n, line in enumerate(lines, 1) if line.strip()]
    if retry_errors and any(record.get("error") is not None for _, record in records):
        records = [(line, record) for line, record in records if record.get("error") is None]
        with open(output_path + ".tmp", "wb") as f:
            f.writelines(line for line, _ in records)
        os.replace(output_path + ".tmp", output_path)
    return Counter(json.dumps(record["custom_id"] if "custom_id" in record else record["id"]) for _, record in records)


def _record(line: bytes, path: str, n: int) -> dict:
    """The batch result on line ``n`` of ``path``; ValueError if it is none."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("custom_id", record.get("id")) is None:
        raise ValueError(f"{path} line {n} is not a batch result; give another --output")
    return record


def _plan(
    input_path: str, defaults: RequestDefaults, engine: AsyncEngine, written: Counter[str]
) -> Iterator[tuple[Job, bool]]:
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
            job = parse_line(raw, n, defaults, engine)
            first = seen.setdefault(job.key, n)
            if first != n:
                job.error = job.error or f"line {n}: duplicate id {job.id!r} (first on line {first})"
                job.duplicate_id, job.id = job.id, f"line-{n}"
            yield job, counts[job.key] < written[job.key]
            counts[job.key] += 1


async def _run_job(
    engine: AsyncEngine, job: Job, model: str, adapters: Collection[str]
) -> AsyncIterator[tuple[dict, int]]:
    """The record of one job and its output tokens; an engine ValueError becomes an error record.

    An OpenAI job whose body's ``model`` is one of ``adapters`` runs through that LoRA adapter.
    """
    if job.error is not None:
        yield _error_record(job), 0
        return
    request_id = uuid.uuid4().hex
    if job.openai and job.body.model in adapters:
        for call in job.calls:
            call.params.lora = job.body.model
    streams = [call.start(engine, f"{request_id}-{i}") for i, call in enumerate(job.calls)]
    try:
        async with contextlib.aclosing(merge(streams)) as merged:
            finals = await fold(merged, len(streams))
    except ValueError as e:
        yield _error_record(dataclasses.replace(job, error=f"line {job.line}: {e}")), 0
        return
    tokens = sum(len(s.token_ids) for final in finals for s in final.outputs)
    if not job.openai:
        yield _simple_record(job, finals[0], tokens), tokens
        return
    reply = job.body.reply(job.body, job.calls, request_id, job.body.model or model, engine, {})
    response = {"status_code": 200, "request_id": request_id, "body": await reply.whole(finals)}
    yield {"id": f"batch_req_{request_id}", "custom_id": job.id, "response": response, "error": None}, tokens


def _error_record(job: Job) -> dict:
    duplicate = {} if job.duplicate_id is None else {"duplicate_id": job.duplicate_id}
    if job.openai:
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": job.id,
            **duplicate,
            "response": None,
            "error": {"code": "invalid_request", "message": job.error},
        }
    return {"id": job.id, **duplicate, "error": job.error}


def _choice(o: CompletionOutput) -> dict:
    choice = {"text": o.text, "finish_reason": o.finish_reason}
    if o.reasoning_content is not None:
        choice["reasoning_content"] = o.reasoning_content
    return choice


def _simple_record(job: Job, out: RequestOutput, tokens: int) -> dict:
    record: dict = {"id": job.id}
    if len(out.outputs) == 1:
        record.update(_choice(out.outputs[0]))
    else:
        record["choices"] = [_choice(o) for o in out.outputs]
    return {**record, "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": tokens}


async def _in_order(streams: Iterable[AsyncIterator[T]], window: int) -> AsyncIterator[T]:
    """The one item of each stream, in stream order, with up to ``window`` streams running at once."""
    ready: dict[int, T] = {}
    emitted = 0
    async with contextlib.aclosing(merge(streams, window)) as merged:
        async for i, item in merged:
            ready[i] = item
            while emitted in ready:
                yield ready.pop(emitted)
                emitted += 1


def check_paths(input_path: str, output_path: str) -> None:
    """Raise unless the input exists and the output is another file."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"no such input file: {input_path}")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise ValueError("the input and the output are the same file")


async def run_batch(
    engine: AsyncEngine,
    defaults: RequestDefaults,
    input_path: str,
    output_path: str,
    adapters: Collection[str] = (),
    retry_errors: bool = False,
) -> BatchSummary:
    """Run every request of ``input_path`` that ``output_path`` lacks, appending results in input order.

    What a line leaves out takes ``defaults``, as in the server; an OpenAI line whose ``model`` is one of
    the LoRA ``adapters`` runs through it. A line that cannot run is written as an error record and the
    job goes on; ``retry_errors`` runs the error records of an earlier run again.
    """
    check_paths(input_path, output_path)
    written = load_written(output_path, retry_errors)
    await engine.start()
    summary = BatchSummary()
    todo = 0
    for _, skip in _plan(input_path, defaults, engine, written):
        summary.skipped += skip
        todo += not skip
    model = model_name(engine.config.model)
    plan = _plan(input_path, defaults, engine, written)
    jobs = (_run_job(engine, job, model, adapters) for job, skip in plan if not skip)
    return await run_jobs(engine, jobs, output_path, summary, todo)


async def run_jobs(
    engine: AsyncEngine,
    jobs: Iterable[AsyncIterator[tuple[dict, int]]],
    output_path: str,
    summary: BatchSummary,
    total: int,
) -> BatchSummary:
    """Run ``jobs`` (each yields one record and its output tokens), many at once, appending their records to
    ``output_path`` in order. Shows a progress bar and prints a summary line to stderr. While it runs in the
    main thread, SIGTERM stops it cleanly and exits with status 143.
    """
    window = max(MIN_IN_FLIGHT, 2 * engine.config.max_num_seqs)
    start = time.perf_counter()
    finished = False
    try:
        with _sigterm_exits():
            async with contextlib.aclosing(_in_order(jobs, window)) as results:
                await _write(results, output_path, summary, total, start)
        finished = True
    finally:
        summary.seconds = time.perf_counter() - start
        print(
            f"batch: {summary.done} done, {summary.skipped} skipped, {summary.errors} errors, {summary.tokens} output "
            f"tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tok/s)"
            + ("" if finished else "; stopped early, run it again to resume"),
            file=sys.stderr,
        )
    return summary


async def _write(
    results: AsyncIterator[tuple[dict, int]], output_path: str, summary: BatchSummary, total: int, start: float
) -> None:
    """Append each record to the output as one flushed line, counting it in ``summary`` and on a progress bar."""
    with tqdm(total=total, desc="Batch", unit="req") as bar, open(output_path, "ab") as out:
        async for record, tokens in results:
            out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            out.flush()
            summary.add(record, tokens)
            bar.set_postfix_str(f"{summary.tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
            bar.update(1)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM cancels the running task, which then exits with status 143.

    Only in the main thread, and only while SIGTERM has its default action.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if own:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        yield
    except asyncio.CancelledError:
        if terminated:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        if own:
            loop.remove_signal_handler(signal.SIGTERM)
