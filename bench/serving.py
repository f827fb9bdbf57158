"""Online serving: streaming /v1/completions under Poisson arrivals, against ``tristream serve`` or any
OpenAI-compatible server.

Server: with ``--base-url URL`` one already runs there (tristream, vLLM, SGLang,
...) and nothing is started; ``--model`` names the served model (default: the first
id of GET /v1/models). Without it, ``tristream serve`` runs as a subprocess on
``--model``'s real weights (a Hugging Face folder, .gguf file or Hub id; default:
the bundled SmolLM2-135M-Instruct) or on ``--config``'s config.json with dummy
weights (bench/configs/llama-3-8b.json: Llama-3-8B, bf16 on the GPU), with the
engine flags given here.

Workload: for each request rate (default 4, 8, 16, 32 and inf requests/s), 200
requests whose send times form a Poisson process (exponential gaps, fixed seed;
inf sends them all at once), at most ``--concurrency`` of them in flight. A request
is a prompt of 512 tokens with ``max_tokens=256``, ``ignore_eos`` and greedy
sampling (vLLM's benchmark_serving defaults), and ``stream_options.include_usage``
so that the last event counts the tokens. The rates run one after another on the
same server, after a warm-up. This process draws the prompts and send times;
request i goes to client process i mod ``--client-processes`` (the in-flight limit
is split between them), which streams its share with httpx and sends back what it
timed.

Prompts: random token ids of the tokenizer (``--tokenizer``, default the model's)
decoded to text, encoded again and cut to the input length. Where no tokenizer
loads, the prompts are lists of random token ids under 32000, which most servers
take on /v1/completions. On dummy weights the prompts are token ids anywhere in
the vocabulary, and the server needs a tokenizer to stream text: a word-level
tokenizer with one word per model token ("t0", "t1", ..., the model's whole
vocabulary) is written into the dummy model's folder, so that every generated id
decodes to its own non-empty text and the server streams exactly one chunk per
token. (A real, smaller tokenizer would decode most of a dummy model's ids to
nothing, and the server sends no chunk for empty text.) Token counts come from
``usage``; the report counts the requests whose text chunks differ from it.

Per rate, over the requests that completed:
- TTFT: from sending the request to its first text chunk;
- ITL: the gaps between consecutive text chunks, over all requests;
- TPOT: per request, (E2E - TTFT) / (output tokens - 1);
- E2E: from sending the request to the end of its stream;
- each as mean, p50, p90 and p99; request throughput and output tok/s over the
  time from the first send to the last end; goodput: the requests/s that met the
  SLO, TTFT <= --slo-ttft-ms and TPOT <= --slo-tpot-ms;
- CPU share: CPU seconds over the run's wall time of each client process and,
  when the server was started here, of the server and each of its processes
  (tokenizer, scheduler, GPU), from /proc.

It writes bench/results/serving-<gpu, cpu or remote>.json (bench-results/ in the
working directory where tristream is installed, not checked out) and, when
matplotlib is installed, a PNG of the latency percentiles and throughputs against
rate. ``tristream bench serve`` takes the same flags.

    python bench/serving.py --config bench/configs/llama-3-8b.json   # GPU: dummy Llama-3-8B, bf16
    python bench/serving.py --model Qwen/Qwen3-8B --rates inf --concurrency 64
    # a server that already runs: vLLM, SGLang or tristream
    tristream bench serve --base-url http://127.0.0.1:8000 --tokenizer Qwen/Qwen3-8B --concurrency 256
    # CPU smoke test on the bundled model
    OMP_NUM_THREADS=1 python bench/serving.py --device cpu --rates 8 inf \\
        --num-requests 16 --input-len 32 --output-len 16 --out /tmp/serving.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from tristream.bench.report import RESULTS, header, model_summary, now, write_report
from tristream.bench.serving_client import ClientPool, Result
from tristream.bench.throughput import add_bench_engine_args, add_model_args, bench_model, resolve_device
from tristream.cli import engine_args
from tristream.config import EngineConfig
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model

# Token ids of prompts sent without a tokenizer: under the smallest vocabulary of common models (Llama 2, Mistral).
FALLBACK_VOCAB = 32000
# Tokens of room past input + output length: a prompt encoded again by the server may come out a little longer.
PROMPT_SLACK = 32


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


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer $OPENAI_API_KEY`` when it is set, as the OpenAI clients send it."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_model(url: str, headers: dict[str, str]) -> str:
    """The first model id that GET ``url``/v1/models lists."""
    response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def load_tokenizer(name: str) -> Any | None:
    """The tokenizer of ``name`` (a folder, a .gguf file or a Hub id); None, saying so, where none loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name) if name.endswith(".gguf") else name)
    except (OSError, ValueError) as e:
        print(f"no tokenizer from {name} ({type(e).__name__}): the prompts are random token ids", flush=True)
        return None


@dataclass
class Prompts:
    """Random prompts: text from ``tokenizer``'s token ids, or token-id lists under ``vocab`` without one."""

    tokenizer: Any | None
    vocab: int

    def make(self, n: int, length: int, rng: random.Random) -> list[str | list[int]]:
        """``n`` prompts of ``length`` tokens."""
        if self.tokenizer is None:
            return [[rng.randrange(self.vocab) for _ in range(length)] for _ in range(n)]
        special = set(self.tokenizer.all_special_ids)
        ids = [i for i in range(len(self.tokenizer)) if i not in special]
        prompts = []
        for _ in range(n):
            text = self.tokenizer.decode([rng.choice(ids) for _ in range(length)])
            prompts.append(self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False)[:length]))
        return prompts

    def describe(self) -> str:
        if self.tokenizer is None:
            return f"random token ids under {self.vocab}, sent as lists"
        return f"random token ids of {self.tokenizer.name_or_path} as text, encoded again and cut to the length"


@dataclass
class Target:
    """The server under test: its address, the served model's name, the prompts it takes, and the process of
    ``tristream serve`` when it was started here."""

    url: str
    model: str
    prompts: Prompts
    headers: dict[str, str]
    server_pid: int | None = None


def arrival_delays(rate: float, n: int, rng: random.Random) -> list[float]:
    """Send times from the first, in seconds: exponential gaps of mean 1 / ``rate`` (all 0 at rate inf)."""
    delays, t = [], 0.0
    for _ in range(n):
        delays.append(t)
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    return delays


def read_stat(pid: int) -> tuple[int, float] | None:
    """The parent pid and the CPU seconds (user + system) of process ``pid``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    """The title a process set (``tristream::scheduler``), else its command line."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            argv = f.read().rstrip("\0").split("\0")
    except OSError:
        return f"pid {pid}"
    return argv[0] if argv[0].startswith("tristream::") else " ".join([os.path.basename(argv[0]), *argv[1:]])[:100]


def process_tree(root: int) -> dict[int, str]:
    """``root`` and every process under it, by pid, each named by ``process_name``; empty without /proc."""
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            parents[int(entry)] = stat[0]
    tree, grew = {root} if root in parents else set(), True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | below, bool(below)
    return {pid: process_name(pid) for pid in sorted(tree)}


def cpu_seconds(pids: dict[int, str]) -> dict[int, float]:
    """The CPU seconds of each process of ``pids`` still running."""
    return {pid: stat[1] for pid in pids if (stat := read_stat(pid)) is not None}


def run_rate(
    pool: ClientPool, target: Target, rate: float, bodies: list[dict], delays: list[float], args: argparse.Namespace
) -> dict:
    """One rate's requests and their figures, with the CPU share of each client process and of the server's
    processes (when it was started here) over the run."""
    server = process_tree(target.server_pid) if target.server_pid else {}
    before = cpu_seconds(server)
    results, client_cpu, t0 = pool.run(target.url, target.headers, bodies, delays, args.concurrency)
    wall = time.time() - t0
    after = cpu_seconds(server)
    shares = [
        {
            "name": "tristream serve" if pid == target.server_pid else name,
            "pid": pid,
            "cpu_share": (after.get(pid, before.get(pid, 0.0)) - before.get(pid, 0.0)) / wall,
        }
        for pid, name in server.items()
    ]
    shares += [
        {"name": f"client {i}", "pid": pool.procs[i].pid, "cpu_share": seconds / wall}
        for i, seconds in enumerate(client_cpu)
    ]
    return {**summarize(rate, results, args), "cpu_share": shares}


def stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}}


def summarize(rate: float, results: list[Result], args: argparse.Namespace) -> dict:
    """The figures of one rate's requests."""
    done = [r for r in results if r.ok]
    good = [
        r for r in done if r.ttft <= args.slo_ttft_ms / 1e3 and (r.tpot is None or r.tpot <= args.slo_tpot_ms / 1e3)
    ]
    output_tokens = sum(r.output_tokens for r in done)
    duration = max(r.send + r.e2e for r in results) - min(r.send for r in results)
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
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": output_tokens,
        "chunk_count_mismatches": sum(len(r.chunk_times) != r.output_tokens for r in done),
        "ttft_s": stats([r.ttft for r in done]),
        "tpot_s": stats([r.tpot for r in done if r.tpot is not None]),
        "itl_s": stats([b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]),
        "e2e_s": stats([r.e2e for r in done]),
    }


def bench(target: Target, args: argparse.Namespace) -> dict[str, dict]:
    """A warm-up, then every rate of ``args`` in turn; the figures by rate."""
    params = {
        "model": target.model,
        "max_tokens": args.output_len,
        "ignore_eos": True,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rng = random.Random(args.seed)
    results = {}
    with ClientPool(args.client_processes) as pool:
        warm = [
            {**params, "max_tokens": min(16, args.output_len), "prompt": p}
            for p in target.prompts.make(4, args.input_len, rng)
        ]
        runs = pool.run(target.url, target.headers, warm, [0.0] * len(warm), args.concurrency)[0]
        if not any(r.ok for r in runs):
            raise RuntimeError(f"the warm-up requests to {target.url} failed: {runs[0].error}")
        for rate in args.rates:
            bodies = [{**params, "prompt": p} for p in target.prompts.make(args.num_requests, args.input_len, rng)]
            delays = arrival_delays(rate, len(bodies), rng)
            results[f"{rate:g}"] = r = run_rate(pool, target, rate, bodies, delays, args)
            print(f"rate {rate:>5g}: {line(r)}", flush=True)
    return results


def server_args(engine: dict) -> list[str]:
    """The ``tristream serve`` flags of the engine arguments that differ from the engine's defaults."""
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    flags = []
    for name, value in engine.items():
        if value == fields[name].default:
            continue
        flag = fields[name].metadata.get("flag", "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            flags += [flag, *(f"{k}={v}" for k, v in value.items())]
        else:
            flags += [flag, str(value)]
    return flags


def bench_remote(args: argparse.Namespace) -> dict:
    """The rates against the server at ``--base-url``; the report's fields of the server, the model and the
    results."""
    url, headers = args.base_url.rstrip("/").removesuffix("/v1"), auth_headers()
    name = args.model or served_model(url, headers)
    target = Target(url, name, Prompts(load_tokenizer(args.tokenizer or name), FALLBACK_VOCAB), headers)
    results = bench(target, args)
    return {
        "gpu": None,
        "server": {"base_url": url, "started_here": False},
        "model": {"name": name},
        "prompts": target.prompts.describe(),
        "results": results,
    }


def bench_local(args: argparse.Namespace) -> dict:
    """The rates against ``tristream serve`` started here on the model of ``args``; the report's fields of the
    server, the model and the results."""
    gpu = device_name(args.device)
    max_len = args.input_len + args.output_len + PROMPT_SLACK
    model = bench_model(args, max_len)
    mc = ModelConfig.load(model.path)
    if model.dummy:
        write_tokenizer(pathlib.Path(model.path), mc.vocab_size)
        prompts = Prompts(None, mc.vocab_size)
    else:
        prompts = Prompts(load_tokenizer(args.tokenizer or model.path), min(mc.vocab_size, FALLBACK_VOCAB))
    engine = {**engine_args(args), "model": model.path, "load_format": model.load_format, "max_model_len": max_len}
    flags = server_args(engine)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(model.close)
        baseline = offline(engine, prompts, args) if args.offline else None
        server = Server(flags)
        cleanup.callback(server.stop)
        headers = auth_headers()
        target = Target(server.url, served_model(server.url, headers), prompts, headers, server.proc.pid)
        results = bench(target, args)
    if baseline is not None:
        for r in results.values():
            r["vs_offline"] = r["output_tok_per_s"] / baseline["output_tok_per_s"]
    return {
        "gpu": gpu,
        "server": {"base_url": server.url, "started_here": True, "flags": flags},
        "offline": baseline,
        "model_config": args.config,
        "model": {"name": model.name, **model_summary(mc, args.dtype)},
        "prompts": prompts.describe(),
        "results": results,
    }


def offline(engine: dict, prompts: Prompts, args: argparse.Namespace) -> dict:
    """The same workload through ``LLM.generate`` on an engine of the server's flags, every request at once but
    at most ``--concurrency`` running: its output tok/s, the figure the served rates are compared with."""
    from tristream import LLM, SamplingParams

    rng = random.Random(args.seed)
    batch = prompts.make(args.num_requests, args.input_len, rng)
    seqs = min(engine.get("max_num_seqs") or EngineConfig.max_num_seqs, args.concurrency or math.inf)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature)
    with LLM(**{**engine, "max_num_seqs": seqs}) as llm:
        llm.generate(prompts.make(4, args.input_len, rng), SamplingParams(max_tokens=16), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    print(f"offline: {tokens / seconds:.0f} output tok/s through LLM.generate", flush=True)
    return {"max_num_seqs": seqs, "duration_s": seconds, "output_tokens": tokens, "output_tok_per_s": tokens / seconds}


def run(args: argparse.Namespace) -> dict:
    """The benchmark of ``args``, against ``--base-url`` or a server started here; the report."""
    started = now()
    fields = bench_remote(args) if args.base_url else bench_local(args)
    results = fields.pop("results")
    return {
        **header("serving", started),
        **fields,
        "workload": {
            "rates": [r if math.isfinite(r) else "inf" for r in args.rates],
            "num_requests_per_rate": args.num_requests,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "concurrency": args.concurrency,
            "client_processes": args.client_processes,
            "seed": args.seed,
            "sampling": {"temperature": args.temperature, "ignore_eos": True, "max_tokens": args.output_len},
            "arrivals": "Poisson: exponential gaps with mean 1/rate; inf sends all at once",
        },
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "results": results,
        "definitions": DEFINITIONS,
    }


DEFINITIONS = {
    "ttft_s": "sending the request -> its first text chunk",
    "itl_s": "gaps between consecutive text chunks, pooled over the requests (chunks read together give gaps near 0)",
    "tpot_s": "per request: (e2e - ttft) / (output tokens - 1)",
    "e2e_s": "sending the request -> the end of its stream",
    "duration_s": "first send -> last stream end",
    "output_tokens": "usage.completion_tokens summed over the completed requests (text chunks where no usage came)",
    "goodput_req_per_s": "requests with ttft <= slo.ttft_ms and tpot <= slo.tpot_ms / duration_s",
    "chunk_count_mismatches": "completed requests whose number of text chunks differs from usage.completion_tokens",
    "cpu_share": "CPU seconds (user + system) of each process from the run's start to its end / that wall time",
    "vs_offline": "output_tok_per_s over that of the same workload through LLM.generate (offline) in the same run",
}


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
        f"{title(report)}, {w['input_len']} in / {w['output_len']} out, {w['num_requests_per_rate']} requests per rate"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def title(report: dict) -> str:
    """Where the server ran, the model and its dtype (unknown for a server at --base-url)."""
    where = report["gpu"] or ("CPU" if report["server"]["started_here"] else report["server"]["base_url"])
    return ", ".join([where, report["model"]["name"], *filter(None, [report["model"].get("dtype")])])


def print_table(report: dict) -> None:
    """The figures of every rate, then the CPU shares."""
    print(f"\n{title(report)}; SLO TTFT <= {report['slo']['ttft_ms']:g} ms, TPOT <= {report['slo']['tpot_ms']:g} ms")
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
    if report.get("offline"):
        vs = ", ".join(f"rate {rate}: {r['vs_offline']:.2f}" for rate, r in report["results"].items())
        print(
            f"offline (LLM.generate): {report['offline']['output_tok_per_s']:.1f} output tok/s; served vs offline: {vs}"
        )
    for rate, r in report["results"].items():
        shares = ", ".join(f"{s['name']} {100 * s['cpu_share']:.0f}%" for s in r["cpu_share"])
        print(f"CPU share at rate {rate}: {shares}")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of this benchmark."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("server")
    g.add_argument(
        "--base-url",
        default=None,
        help="an OpenAI-compatible server that runs already, e.g. http://127.0.0.1:8000 (default: start "
        "tristream serve here)",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer of the prompts (and of a server started here): a folder, .gguf file or Hub id "
        "(default: the model's)",
    )
    add_model_args(
        parser,
        "with --base-url, the served model's name (default: the first of /v1/models); else the model to serve: "
        "a Hugging Face folder, .gguf file or Hub id (default: the bundled SmolLM2-135M-Instruct, unless --config)",
    )
    add_bench_engine_args(parser, skip=("tokenizer",))
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[4, 8, 16, 32, math.inf],
        help="requests per second, 'inf' for all at once",
    )
    g.add_argument("--num-requests", type=int, default=200, help="per rate")
    g.add_argument("--input-len", type=int, default=512)
    g.add_argument("--output-len", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    g.add_argument(
        "--client-processes",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes that stream the requests (default: 4, or fewer CPUs)",
    )
    g.add_argument(
        "--offline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with a server started here, first run the same workload through LLM.generate, the served rates' "
        "vs_offline",
    )
    g.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    g.add_argument("--slo-tpot-ms", type=float, default=50.0)
    parser.add_argument("--out", default=None, help=f"default: {RESULTS}/serving-<gpu, cpu or remote>.json")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the benchmark of the command line ``argv``, write its report and print its table; the report."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.base_url and args.config:
        parser.error("--config is the model of a server started here; --base-url names one that runs")
    if args.client_processes < 1 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--client-processes and --concurrency must be at least 1")
    resolve_device(args)
    report = run(args)
    write_report(report, "serving", report["gpu"] or ("remote" if args.base_url else None), args.out, plot)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
