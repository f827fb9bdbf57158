"""Online serving: ``tristream serve`` under Poisson arrivals, streaming /v1/completions over HTTP.

The server runs as a subprocess on a config.json with dummy weights (default:
Llama-3-8B in bf16 on the GPU). For each request rate (default 4, 8, 16, 32 and
inf requests/s) this process sends 200 requests whose send times form a Poisson
process (exponential gaps, fixed seed; inf sends them all at once) and streams
each one with httpx. A request is a random token-id prompt of 512 tokens with
``max_tokens=256``, ``ignore_eos`` and greedy sampling (vLLM's benchmark_serving
defaults), and ``stream_options.include_usage`` so that the last event counts the
tokens. The rates run one after another on the same server, after a warm-up.

Tokenizer: the server needs one to stream text, and the GPU machine has no
tokenizer files. So a word-level tokenizer with one word per model token ("t0",
"t1", ..., the model's whole vocabulary) is written into the dummy model's
folder: every generated id decodes to its own non-empty text, so the server
streams exactly one chunk per token, and prompt ids may be anywhere in the
vocabulary. (A real, smaller tokenizer would decode most of a dummy model's ids
to nothing, and the server sends no chunk for empty text.) Token counts come
from ``usage``; the report counts the requests whose text chunks differ from it.

Per rate, over the requests that completed:
- TTFT: from sending the request to its first text chunk;
- ITL: the gaps between consecutive text chunks, over all requests;
- TPOT: per request, (E2E - TTFT) / (output tokens - 1);
- E2E: from sending the request to the end of its stream;
- each as mean, p50 and p99; request throughput and output tok/s over the time
  from the first send to the last end; goodput: the requests/s that met the SLO,
  TTFT <= --slo-ttft-ms and TPOT <= --slo-tpot-ms.

It writes bench/results/serving-<gpu or cpu>.json and, when matplotlib is
installed, a PNG of the latency percentiles and throughputs against rate.

    python bench/serving.py                          # GPU: dummy Llama-3-8B, bf16
    # CPU smoke test; tiny.json: a Llama config of 2 layers, hidden 256, vocab 1024
    OMP_NUM_THREADS=1 python bench/serving.py --device cpu --config tiny.json --rates 8 inf \\
        --num-requests 16 --input-len 32 --output-len 16 --out /tmp/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import pathlib
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import header, model_summary, now, write_report  # noqa: E402
from throughput import add_dummy_engine_args, dummy_model, resolve_device  # noqa: E402

from tristream.cli import engine_args  # noqa: E402
from tristream.config import EngineConfig  # noqa: E402
from tristream.model_config import ModelConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """One request as the client saw it; times in seconds from its sending."""

    ok: bool = False
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def write_tokenizer(folder: pathlib.Path, vocab_size: int) -> None:
    """A word-level tokenizer with the word ``t<id>`` for every model token id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


def device_name(device: str) -> str | None:
    """The GPU's name, asked in a child process so that this one holds no CUDA context beside the server."""
    if device == "cpu":
        return None
    code = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    return (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() or None
    )


class Server:
    """``tristream serve --port 0`` as a subprocess; its output is drained into ``log``."""

    def __init__(self, args: list[str], timeout: float = 900.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tristream", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.log.append(line)
            m = re.search(r"serving \S+ at (http://\S+)/v1", line)
            if m:
                self.url = m.group(1)
                threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("tristream serve did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def send(http: httpx.AsyncClient, body: dict, delay: float, t0: float) -> tuple[float, Result]:
    """Send ``body`` at ``t0 + delay`` and stream it; (send time from t0, result)."""
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    start = time.perf_counter()
    r = Result(prompt_tokens=len(body["prompt"]))
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                r.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                return start - t0, r
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    r.error = str(event["error"])[:300]
                elif event["choices"]:
                    if event["choices"][0]["text"]:
                        r.chunk_times.append(time.perf_counter() - start)
                elif event.get("usage"):
                    r.output_tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    r.e2e = time.perf_counter() - start
    r.ttft = r.chunk_times[0] if r.chunk_times else None
    r.ok = r.error is None and r.ttft is not None
    return start - t0, r


async def run_rate(
    http: httpx.AsyncClient, rate: float, prompts: list[list[int]], params: dict, rng: random.Random
) -> tuple[float, list[Result]]:
    """All ``prompts`` at Poisson arrivals of ``rate`` per second; (seconds from the first send to the last end, results)."""
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(send(http, {**params, "prompt": p}, d, t0) for p, d in zip(prompts, delays)))
    first = min(s for s, _ in runs)
    return max(s + r.e2e for s, r in runs) - first, [r for _, r in runs]


def stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(rate: float, duration: float, results: list[Result], args: argparse.Namespace) -> dict:
    done = [r for r in results if r.ok]
    good = [
        r for r in done if r.ttft <= args.slo_ttft_ms / 1e3 and (r.tpot is None or r.tpot <= args.slo_tpot_ms / 1e3)
    ]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tok_per_s": output_tokens / duration,
        "total_tok_per_s": (output_tokens + sum(r.prompt_tokens for r in done)) / duration,
        "goodput_req_per_s": len(good) / duration,
        "slo_attained_fraction": len(good) / len(results),
        "output_tokens": output_tokens,
        "chunk_count_mismatches": sum(len(r.chunk_times) != r.output_tokens for r in done),
        "ttft_s": stats([r.ttft for r in done]),
        "tpot_s": stats([r.tpot for r in done if r.tpot is not None]),
        "itl_s": stats([b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]),
        "e2e_s": stats([r.e2e for r in done]),
    }


async def bench(url: str, vocab: int, args: argparse.Namespace) -> dict[str, dict]:
    params = {
        "max_tokens": args.output_len,
        "ignore_eos": True,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=args.num_requests + 8, max_keepalive_connections=args.num_requests + 8)
    results = {}
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        rng = random.Random(args.seed)
        warm = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(4)]
        await run_rate(http, math.inf, warm, {**params, "max_tokens": min(16, args.output_len)}, rng)
        for rate in args.rates:
            prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]
            duration, runs = await run_rate(http, rate, prompts, params, rng)
            results[f"{rate:g}"] = r = summarize(rate, duration, runs, args)
            print(f"rate {rate:>5g}: {line(r)}", flush=True)
    return results


def server_args(folder: pathlib.Path, max_len: int, args: argparse.Namespace) -> list[str]:
    """The ``tristream serve`` flags of the engine arguments that differ from the engine's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    flags = ["--model", str(folder), "--max-model-len", str(max_len)]
    for name, value in engine_args(args).items():
        flag = "--" + name.replace("_", "-")
        if value == defaults[name] or name == "max_model_len":
            continue
        flags += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return flags


def main(args: argparse.Namespace) -> dict:
    started = now()
    gpu = device_name(args.device)
    max_len = args.input_len + args.output_len
    folder = dummy_model(args.config, max_len)
    mc = ModelConfig.load(str(folder))
    write_tokenizer(folder, mc.vocab_size)
    flags = server_args(folder, max_len, args)
    server = Server(flags)
    try:
        results = run_client(bench(server.url, mc.vocab_size, args))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {
        **header("serving", started),
        "gpu": gpu,
        "model_config": args.config,
        "model": {"name": pathlib.Path(args.config).stem + " (dummy weights)", **model_summary(mc, args.dtype)},
        "server_flags": flags[2:],
        "tokenizer": "word-level, one word per model token, written beside the dummy config (see the docstring)",
        "workload": {
            "rates": [r if math.isfinite(r) else "inf" for r in args.rates],
            "num_requests_per_rate": args.num_requests,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "prompts": "random token ids",
            "sampling": {"temperature": args.temperature, "ignore_eos": True, "max_tokens": args.output_len},
            "arrivals": "Poisson: exponential gaps with mean 1/rate; inf sends all at once",
        },
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "results": results,
        "definitions": {
            "ttft_s": "sending the request -> its first text chunk",
            "itl_s": "gaps between consecutive text chunks, pooled over the requests (chunks read together give gaps near 0)",
            "tpot_s": "per request: (e2e - ttft) / (output tokens - 1)",
            "e2e_s": "sending the request -> the end of its stream",
            "duration_s": "first send -> last stream end",
            "goodput_req_per_s": "requests with ttft <= slo.ttft_ms and tpot <= slo.tpot_ms / duration_s",
            "chunk_count_mismatches": "completed requests whose number of text chunks differs from usage.completion_tokens",
        },
    }


def run_client(coro):
    """``asyncio.run``, on uvloop when it is installed: a lighter client at high concurrency."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def line(r: dict) -> str:
    return (
        f"{r['completed']}/{r['num_requests']} ok  {r['request_throughput']:6.2f} req/s  {r['output_tok_per_s']:9.1f} "
        f"output tok/s  TTFT p50 {ms(r['ttft_s']['p50'])} p99 {ms(r['ttft_s']['p99'])} ms  ITL p50 "
        f"{ms(r['itl_s']['p50'])} p99 {ms(r['itl_s']['p99'])} ms  goodput {r['goodput_req_per_s']:6.2f} req/s"
    )


def ms(x: float | None) -> str:
    return f"{1e3 * x:8.1f}" if x is not None else "     n/a"


def plot(report: dict, path: pathlib.Path) -> None:
    """Latency percentiles and throughputs against the request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["results"])
    rows = list(report["results"].values())
    x = range(len(labels))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, key, title in zip(axes.flat, ("ttft_s", "itl_s", "e2e_s"), ("TTFT", "ITL", "end-to-end latency")):
        for p, style in (("p50", "o-"), ("p99", "s--"), ("mean", "^:")):
            ax.plot(x, [1e3 * r[key][p] if r[key][p] is not None else float("nan") for r in rows], style, label=p)
        ax.set_title(f"{title} (ms)")
    slo = report["slo"]
    axes[0, 0].axhline(slo["ttft_ms"], color="gray", lw=0.8, label="SLO")
    ax = axes[1, 1]
    ax.plot(x, [r["request_throughput"] for r in rows], "o-", label="completed req/s")
    ax.plot(
        x,
        [r["goodput_req_per_s"] for r in rows],
        "s--",
        label=f"goodput req/s (TTFT<={slo['ttft_ms']:g} ms, TPOT<={slo['tpot_ms']:g} ms)",
    )
    ax.set_title("throughput")
    for ax in axes.flat:
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    w = report["workload"]
    fig.suptitle(
        f"{report['gpu'] or 'CPU'}: {report['model']['name']}, {report['model']['dtype']}, "
        f"{w['input_len']} in / {w['output_len']} out, {w['num_requests_per_rate']} requests per rate"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(report: dict) -> None:
    print(
        f"\n{report['gpu'] or 'CPU'}, {report['model']['name']}, {report['model']['dtype']}; "
        f"SLO TTFT <= {report['slo']['ttft_ms']:g} ms, TPOT <= {report['slo']['tpot_ms']:g} ms"
    )
    print(
        f"{'rate':>5} | {'ok':>7} | {'req/s':>6} | {'out tok/s':>9} | {'goodput':>7} | {'TTFT p50':>8} | {'TTFT p99':>8} | "
        f"{'ITL p50':>8} | {'ITL p99':>8} | {'TPOT p50':>8} | {'E2E p50':>8} | {'E2E p99':>8}   (ms)"
    )
    for rate, r in report["results"].items():
        print(
            f"{rate:>5} | {r['completed']:>3}/{r['num_requests']:<3} | {r['request_throughput']:6.2f} | "
            f"{r['output_tok_per_s']:9.1f} | {r['goodput_req_per_s']:7.2f} | {ms(r['ttft_s']['p50'])} | "
            f"{ms(r['ttft_s']['p99'])} | {ms(r['itl_s']['p50'])} | {ms(r['itl_s']['p99'])} | "
            f"{ms(r['tpot_s']['p50'])} | {ms(r['e2e_s']['p50'])} | {ms(r['e2e_s']['p99'])}"
        )
    bad = {rate: r["chunk_count_mismatches"] for rate, r in report["results"].items() if r["chunk_count_mismatches"]}
    if bad:
        print(f"requests whose chunks differ from their token count, by rate: {bad}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dummy_engine_args(parser)
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[4, 8, 16, 32, math.inf],
        help="requests per second, 'inf' for all at once",
    )
    parser.add_argument("--num-requests", type=int, default=200, help="per rate")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0)
    parser.add_argument("--out", default=None, help="default: bench/results/serving-<gpu or cpu>.json")
    args = parser.parse_args()
    resolve_device(args)
    report = main(args)
    write_report(report, "serving", report["gpu"], args.out, plot)
    print_table(report)
