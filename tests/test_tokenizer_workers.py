"""Several tokenizer workers sharing the requests, prompts refused before they are tokenized whole, the
server's request size limit, and the tokenizer's busy time in the step accounting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import wait_gone  # pytest has imported the conftest under this name
from tristream import AsyncEngine, EngineDeadError, SamplingParams
from tristream.cli import parse_args
from tristream.config import EngineConfig
from tristream.protocol import GenerateRequest, tokenizer_worker
from tristream.server import build_app
from tristream.tokenizer_proc.lengths import PIECE_CHARS, LengthGuard, max_token_chars
from tristream.tokenizer_proc.main import TokenizerWorker
from tristream.tokenizer_proc.templates import BUILTIN_TEMPLATES

WORKERS = 2
MAX_MODEL_LEN = 1024
THINK_TEMPLATE = BUILTIN_TEMPLATES["chatml"].replace(
    "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
async def engine2():
    """One engine with two tokenizer workers for the module (a think reasoning parser, which leaves output
    without <think> tags as content)."""
    async with AsyncEngine(
        max_model_len=MAX_MODEL_LEN, tokenizer_workers=WORKERS, reasoning_parser="think", log_level="WARNING"
    ) as eng:
        yield eng


def ids_on(worker: int, count: int, prefix: str) -> list[str]:
    """``count`` request ids that tokenizer worker ``worker`` of two owns."""
    ids = (f"{prefix}-{i}" for i in range(1000))
    return [rid for rid in ids if tokenizer_worker(rid, WORKERS) == worker][:count]


async def run(stream) -> dict:
    """The deltas of a stream of one sample gathered: texts, token ids, reasoning, finish reason."""
    texts, ids, reasoning, reason = [], [], [], None
    async for out in stream:
        o = out.outputs[0]
        texts.append(o.text)
        ids += o.token_ids
        reasoning.append(o.reasoning_content or "")
        reason = o.finish_reason or reason
    return {"text": "".join(texts), "deltas": texts, "ids": ids, "reasoning": "".join(reasoning), "reason": reason}


def test_the_worker_of_a_request_is_a_stable_hash_of_its_id():
    assert [tokenizer_worker(rid, 3) for rid in ("a", "b", "a")] == [tokenizer_worker(rid, 3) for rid in "aba"]
    assert {tokenizer_worker(f"r{i}", 4) for i in range(64)} == {0, 1, 2, 3}
    assert tokenizer_worker("any", 1) == 0


def test_flags_reach_the_engine_and_the_server():
    args = parse_args(["serve", "--tokenizer-workers", "3", "--max-request-bytes", "1000"])
    assert (args.tokenizer_workers, args.max_request_bytes) == (3, 1000)
    assert parse_args(["serve"]).max_request_bytes == 16 << 20
    with pytest.raises(ValueError, match="tokenizer_workers"):
        AsyncEngine(tokenizer_workers=0)


async def test_each_worker_runs_as_its_own_process(engine2, alive):
    pids = engine2.child_pids
    assert {"tokenizer", "tokenizer1"} <= set(pids) and all(alive(p) for p in pids.values())
    with open(f"/proc/{pids['tokenizer1']}/cmdline") as f:
        assert f.read().split("\0")[0] == "tristream::tokenizer1"


async def test_deltas_of_concurrent_requests_on_both_workers_arrive_in_order(engine2, tokenizer):
    prompts = ["Write a short poem about the sea.", "用中文介绍一下巴黎。🙂"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    rids = ids_on(0, 3, "order") + ids_on(1, 3, "order")
    jobs = [engine2.generate(prompts[i % 2], params, request_id=rid) for i, rid in enumerate(rids)]
    results = await asyncio.gather(*map(run, jobs))
    for i, res in enumerate(results):
        assert len(res["ids"]) == 24 and res["reason"] == "length"
        assert res["text"] == tokenizer.decode(res["ids"], skip_special_tokens=True)
        assert res["ids"] == results[i % 2]["ids"] and res["text"] == results[i % 2]["text"]


async def test_stop_strings_end_requests_on_either_worker(engine2):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompt = "List the planets of the solar system."
    whole = (await run(engine2.generate(prompt, params)))["text"]
    stop = whole[len(whole) // 2 : len(whole) // 2 + 4]
    assert stop.strip() and stop in whole
    stopped = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop])
    rids = ids_on(0, 1, "stop") + ids_on(1, 1, "stop")
    for res in await asyncio.gather(*[run(engine2.generate(prompt, stopped, request_id=r)) for r in rids]):
        assert res["text"] == whole[: whole.index(stop)] and res["reason"] == "stop"


async def test_abort_on_either_worker_during_and_after_admission(engine2):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def abort_after(rid: str, outputs: int) -> dict:
        stream = engine2.generate("Tell me a long story.", params, request_id=rid)
        first = asyncio.ensure_future(anext(stream))
        if outputs:
            await first
        else:
            await asyncio.sleep(0)  # the request is sent; abort it while it is being admitted
        await engine2.abort(rid)
        head = await first
        res = await run(stream)
        return {**res, "reason": res["reason"] or head.outputs[0].finish_reason}

    rids = ids_on(0, 2, "abort") + ids_on(1, 2, "abort")
    results = await asyncio.wait_for(asyncio.gather(*[abort_after(r, i % 2) for i, r in enumerate(rids)]), 60)
    assert [res["reason"] for res in results] == ["abort"] * 4
    deadline = time.monotonic() + 10
    while (stats := await engine2.get_stats()).num_running + stats.num_waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert stats.num_running == stats.num_waiting == 0


def test_a_request_aborted_during_admission_ends_there(model_dir, tmp_path):
    worker = TokenizerWorker(EngineConfig(model=model_dir, max_model_len=512), str(tmp_path), worker=1)
    req = GenerateRequest("r", SamplingParams(n=2, max_tokens=4), time.time(), prompt="Hi")
    worker.begin(req)
    assert worker.abort("r") == []
    out = worker.register(worker.admission.admit(req))
    assert [(d.index, d.finished, d.finish_reason) for d in out] == [(0, True, "abort"), (1, True, "abort")]
    assert worker.active == worker.admitting == {}
    first, second = worker.admit(req)
    assert (first.worker, second.worker, second.fork_of) == (1, 1, "r")
    assert [(a.request_id, a.worker) for a in worker.abort("r")] == [("r", 1), ("r#1", 1)]


async def test_samples_of_one_request_stay_together(engine2, tokenizer):
    params = SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=16, ignore_eos=True)
    for rid in ids_on(0, 1, "n") + ids_on(1, 1, "n"):
        texts: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        async for out in engine2.generate("Name a color.", params, request_id=rid):
            for o in out.outputs:
                texts[o.index] = texts.get(o.index, "") + o.text
                ids[o.index] = ids.get(o.index, []) + o.token_ids
        assert sorted(texts) == [0, 1, 2] and out.finished
        assert all(texts[i] == tokenizer.decode(ids[i], skip_special_tokens=True) for i in range(3))
        assert len({tuple(v) for v in ids.values()}) > 1, "the samples differ"


async def test_reasoning_is_split_on_either_worker(engine2):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    kwargs = {"chat_template": THINK_TEMPLATE}
    for rid in ids_on(0, 1, "think") + ids_on(1, 1, "think"):
        res = await run(engine2.chat(messages, params, request_id=rid, chat_template_kwargs=kwargs))
        assert res["reasoning"].strip() and "<think>" not in res["reasoning"] and res["text"] == ""
        plain = await run(engine2.chat(messages, params, request_id=rid + "-plain"))
        assert plain["text"].strip() and plain["reasoning"] == ""


async def test_a_huge_prompt_is_refused_without_holding_up_other_requests(engine2):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    [rid] = ids_on(1, 1, "huge")
    small_rids = ids_on(1, 3, "small")
    start = time.monotonic()
    huge = asyncio.ensure_future(run(engine2.generate("lorem ipsum " * 700_000, params, request_id=rid)))
    smalls = [asyncio.ensure_future(run(engine2.generate("Hi!", params, request_id=r))) for r in small_rids]
    done = await asyncio.wait_for(asyncio.gather(*smalls), 30)
    assert [len(res["ids"]) for res in done] == [8, 8, 8] and time.monotonic() - start < 10
    with pytest.raises(ValueError, match=f"at least \\d+ tokens.*max_model_len={MAX_MODEL_LEN}"):
        await huge


async def test_tokenizing_a_long_text_does_not_stall_the_streams(engine2):
    """Tokenize calls of a few MB take seconds on the first worker; meanwhile the streams of both workers go
    on: each gets tokens well before the calls return. (On two busy cores a step can take a second, so the
    test asks for progress, not for a rate.)"""
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    rids = ids_on(0, 1, "flow") + ids_on(1, 1, "flow")
    arrivals: dict[str, list[float]] = {rid: [] for rid in rids}

    async def stream(rid: str) -> None:
        async for _ in engine2.generate("Tell me about rivers.", params, request_id=rid):
            arrivals[rid].append(time.monotonic())

    streams = [asyncio.ensure_future(stream(r)) for r in rids]
    while min(map(len, arrivals.values())) < 2:
        await asyncio.sleep(0.01)
    text = "The quick brown fox jumps over the lazy dog. " * 60_000
    start = time.monotonic()
    counts = await asyncio.gather(*[engine2.tokenize(text) for _ in range(WORKERS)])
    end = time.monotonic()
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    assert all(len(ids) > 500_000 for ids in counts) and end - start > 0.5
    inside = {
        rid: [round(t - start, 2) for t in times if start < t < end - 0.1 * (end - start)]
        for rid, times in arrivals.items()
    }
    assert all(inside.values()), (end - start, inside)


def test_max_token_chars_bounds_only_tokenizers_that_keep_every_character(tokenizer):
    assert max_token_chars(tokenizer) == max(map(len, tokenizer.get_vocab()))
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "a": 258, "▁a": 259}
    spm = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True, unk_token="<unk>"))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    assert max_token_chars(PreTrainedTokenizerFast(tokenizer_object=spm)) == len("<0x00>")
    spm.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁"), normalizers.NFC()])
    assert max_token_chars(PreTrainedTokenizerFast(tokenizer_object=spm)) == 4 * len("<0x00>")
    spm.normalizer = normalizers.Strip()
    assert max_token_chars(PreTrainedTokenizerFast(tokenizer_object=spm)) is None
    spm.normalizer, spm.pre_tokenizer = None, pre_tokenizers.Whitespace()
    assert max_token_chars(PreTrainedTokenizerFast(tokenizer_object=spm)) is None
    word_piece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert max_token_chars(PreTrainedTokenizerFast(tokenizer_object=word_piece)) is None


class CountingTokenizer:
    """A tokenizer that counts the characters it encodes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.chars = 0

    def encode(self, text: str, **kwargs) -> list[int]:
        self.chars += len(text)
        return self.inner.encode(text, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_the_length_guard_refuses_early_and_counts_in_pieces(tokenizer):
    counting = CountingTokenizer(tokenizer)
    guard = LengthGuard(counting, 1024)
    guard.check("hello " * 1000)
    with pytest.raises(ValueError, match="at least 12346 tokens"):
        guard.check("x" * (12345 * guard.max_token_chars + 1))
    assert counting.chars == 0
    guard.max_token_chars = None  # as for a tokenizer without a bound: counted piece by piece
    with pytest.raises(ValueError, match="has at least \\d+ tokens.*max_model_len=1024"):
        guard.check("word " * (4 * PIECE_CHARS))
    assert counting.chars <= PIECE_CHARS + 256, "one piece shows it"
    long_but_fitting = ("\n" + " " * 80) * 900  # 81 characters a token
    assert len(long_but_fitting) > PIECE_CHARS and len(tokenizer.encode(long_but_fitting)) < 1024
    guard.check(long_but_fitting)
    assert guard.count_until_limit(long_but_fitting) <= len(tokenizer.encode(long_but_fitting))


async def asgi_request(app, headers: list[tuple[bytes, bytes]], chunks, reads: list[int]) -> tuple[int, dict]:
    """POST /v1/completions to ``app`` with ``chunks`` as the body, counting in ``reads`` the chunks it read."""
    sent: list[dict] = []

    async def receive() -> dict:
        chunk = next(chunks, None)
        reads.append(1)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def test_a_body_over_the_limit_is_a_413_read_no_further(engine2):
    app = build_app(engine2, "m", max_request_bytes=4096)
    reads: list[int] = []
    endless = iter(lambda: b"x" * 1024, None)
    status, body = await asgi_request(app, [(b"content-length", str(10**9).encode())], endless, reads)
    assert status == 413 and reads == []
    assert body == {
        "error": {"message": body["error"]["message"], "type": "invalid_request_error", "param": None, "code": 413}
    }
    assert "4096 bytes" in body["error"]["message"]
    status, body = await asgi_request(app, [(b"transfer-encoding", b"chunked")], endless, reads)
    assert status == 413 and len(reads) == 5 and body["error"]["code"] == 413
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
        r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/completions", json={"prompt": "Hi " * 2000, "max_tokens": 2})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


async def test_tokenizer_busy_time_is_counted_and_exported(engine2):
    await run(engine2.generate("Count to five.", SamplingParams(temperature=0, max_tokens=8)))
    before = (await engine2.get_stats()).tokenizer_busy_s
    await run(engine2.generate("Count to ten.", SamplingParams(temperature=0, max_tokens=8)))
    stats = await engine2.get_stats()
    assert 0 < before < stats.tokenizer_busy_s
    transport = httpx.ASGITransport(app=build_app(engine2, "m"))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
        text = (await http.get("/metrics")).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["tristream_step_tokenizer_busy_seconds_total"] >= stats.tokenizer_busy_s > 0


async def test_a_killed_worker_fails_its_requests_and_the_engine():
    engine = AsyncEngine(max_model_len=512, tokenizer_workers=WORKERS, log_level="ERROR")
    await engine.start()
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    [rid] = ids_on(1, 1, "killed")

    async def consume() -> None:
        async for _ in engine.generate("Tell me everything about the ocean.", params, request_id=rid):
            os.kill(engine.child_pids["tokenizer1"], signal.SIGKILL)

    with pytest.raises(EngineDeadError, match="tokenizer1 process died"):
        await asyncio.wait_for(consume(), 30)
    assert not engine.is_running and not engine.healthy
    with pytest.raises(EngineDeadError):
        await run(engine.generate("Hello", params, request_id=ids_on(0, 1, "after")[0]))
    await engine.close()
    assert wait_gone(engine.child_pids.values()) == []
