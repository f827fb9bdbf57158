"""What the HTTP server costs: the same streaming chat workload through AsyncEngine and through `tristream serve`.

Both runs use the same engine arguments, prompts and greedy sampling with a
fixed number of new tokens, one after the other on the same machine. The server
run streams over SSE with httpx from this process, as concurrent clients.

    python bench/server_overhead.py --clients 1 16 --new-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import re
import statistics
import subprocess
import sys
import time

import httpx

from tristream import AsyncEngine, SamplingParams
from tristream.bench.report import RESULTS, header, model_summary, now
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model

QUESTIONS = [
    "Tell me about the sea.",
    "Name three colours.",
    "What is a cat?",
    "Describe a mountain.",
    "Why do birds sing?",
    "How does rain form?",
    "What is a prime number?",
    "Explain gravity simply.",
]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def summarize(ttfts: list[float], tokens: int, seconds: float) -> dict:
    return {"ttft_p50_s": statistics.median(ttfts), "output_tok_s": tokens / seconds, "seconds": seconds}


async def run_engine(engine: AsyncEngine, clients: int, new_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    async def one(i: int) -> tuple[float, int]:
        start, ttft, n = time.perf_counter(), None, 0
        async for out in engine.chat(messages(i), params):
            n += len(out.outputs[0].token_ids)
            ttft = ttft if ttft is not None or not n else time.perf_counter() - start
        return ttft, n

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)))
    return summarize([r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - start)


async def run_server(url: str, clients: int, new_tokens: int) -> dict:
    body = {
        "temperature": 0,
        "max_tokens": new_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one(http: httpx.AsyncClient, i: int) -> tuple[float, int]:
        start, ttft, n = time.perf_counter(), None, 0
        async with http.stream("POST", "/v1/chat/completions", json={**body, "messages": messages(i)}) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
        return ttft, n

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(http, i) for i in range(clients)))
    return summarize([r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - start)


def start_server(engine_args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tristream", "serve", "--port", "0", *engine_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        m = re.search(r"at (http://\S+)/v1", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("tristream serve did not start")


async def main_async(args: argparse.Namespace) -> dict:
    engine_kwargs = dict(max_model_len=args.max_model_len, log_level="WARNING")
    results: dict[str, dict] = {}
    async with AsyncEngine(**engine_kwargs) as engine:
        await run_engine(engine, 2, 4)
        for c in args.clients:
            results[str(c)] = {"engine": await run_engine(engine, c, args.new_tokens)}
        device = engine.device
    proc, url = start_server(["--max-model-len", str(args.max_model_len), "--log-level", "WARNING"])
    try:
        await run_server(url, 2, 4)
        for c in args.clients:
            results[str(c)]["server"] = await run_server(url, c, args.new_tokens)
    finally:
        proc.terminate()
        proc.wait(60)
    for r in results.values():
        r["ratio_output_tok_s"] = r["server"]["output_tok_s"] / r["engine"]["output_tok_s"]
        r["ttft_added_s"] = r["server"]["ttft_p50_s"] - r["engine"]["ttft_p50_s"]
    return {"engine_device": device, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--out", default=str(RESULTS / "server_overhead.json"))
    args = parser.parse_args()
    started = now()
    measured = asyncio.run(main_async(args))
    mc = ModelConfig.load(resolve_model(None))
    report = {
        **header("server_overhead", started),
        "model": {"name": "SmolLM2-135M-Instruct (bundled)", **model_summary(mc, "float32")},
        "workload": {
            "clients": args.clients,
            "new_tokens": args.new_tokens,
            "sampling": "greedy, ignore_eos",
            "prompts": "chat, one short question per client",
        },
        **measured,
        "definitions": {
            "output_tok_s": "tokens generated by all clients / wall time from the first request to the last token",
            "ratio_output_tok_s": "server / engine",
            "ttft_added_s": "median time to first token through the server minus through AsyncEngine",
        },
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'clients':>7} | {'engine tok/s':>12} | {'server tok/s':>12} | {'ratio':>5} | {'TTFT added ms':>13}")
    for c, r in report["results"].items():
        print(
            f"{c:>7} | {r['engine']['output_tok_s']:>12.1f} | {r['server']['output_tok_s']:>12.1f} | "
            f"{r['ratio_output_tok_s']:>5.2f} | {1000 * r['ttft_added_s']:>13.1f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
