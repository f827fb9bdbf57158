"""Offline throughput through ``LLM``: tokens per second, GPU idle time, and pipelined against synchronous.

The model is ``--model``'s real weights (a Hugging Face folder, .gguf file or Hub
id; default: the bundled SmolLM2-135M-Instruct) or ``--config``'s config.json with
dummy weights (bench/configs/llama-3-8b.json: the reference workload, in bf16 on
the GPU), prompts are random token ids, and sampling is that of vLLM's
benchmark_throughput: temperature 1, top_p 1, ignore_eos, max_tokens = the output
length. One engine (pipelined, the default) runs, after a short warm-up:

- random: 1000 prompts, input and output lengths uniform in [100, 1024] (seed 0);
- fixed: 1000 prompts of 256 in / 256 out;
- batch B, for B in 1, 64, 256: exactly B prompts of the fixed lengths.

A second engine, synchronous (``pipelined=False``) and otherwise the same, then
runs the batch-B sets again: the gain is pipelined over synchronous output tok/s.
Output tok/s counts generated tokens and total tok/s prompt plus generated
tokens, both over the wall time of the ``generate`` call.

While each run goes on, a thread takes ``LLM.get_stats()`` every 0.25 s. From the
differences of its counters come the GPU idle fraction, ``gpu_idle_s / (gpu_busy_s
+ gpu_idle_s)``, and the mean ``scheduler_s``, ``ipc_s`` and ``gpu_busy_s`` per
step, over the whole run and over its steady decode. Steady decode is the set of
sampling intervals with at least 64 requests running at both ends
(``--steady-min-running``), no preemption, and no request admitted in the interval
or in the one before (``num_prompt_tokens`` unchanged): their steps only decode,
since a prompt admitted earlier had a whole interval to finish its last chunks
(prompts here are far shorter than a step's token budget). Requests that wait for a free slot do not change the steps, so they do
not disqualify an interval; with 1000 prompts and 256 slots they wait almost all
the time.

Target: the fixed run's output tok/s over 11,364 tok/s, vLLM's published figure
for Llama-3-8B with dummy weights at 256/256 on one H100. Off an H100 the
reference is scaled by the copy bandwidth measured in this run over the H100's
(``ceilings.copy_bytes_per_s`` of bench/results/latency-h100-80gb-hbm3.json); the
report says which. The copy bandwidth and the bf16 matmul rate are measured first.

It writes bench/results/throughput-<gpu>.json (bench-results/ in the working
directory where tristream is installed, not checked out) and, when matplotlib is
installed, a PNG of output tok/s over time. ``tristream bench throughput`` takes the
same flags.

    python bench/throughput.py --config bench/configs/llama-3-8b.json   # GPU: dummy Llama-3-8B, bf16
    python bench/throughput.py --config bench/configs/llama-3-8b.json --workloads compare  # pipelined vs synchronous
    python bench/throughput.py --config bench/configs/qwen3-30b-a3b.json --workloads fixed \\
        --baseline-config bench/configs/llama-3-8b.json  # a MoE model against a dense one
    tristream bench throughput --model Qwen/Qwen3-8B --workloads fixed   # real weights
    # CPU smoke test on the bundled model
    OMP_NUM_THREADS=1 tristream bench throughput --device cpu --num-prompts 24 --random-range 8 64 \\
        --fixed-lens 32 32 --batch-sizes 1 8 --steady-min-running 4 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

from tristream import LLM, SamplingParams
from tristream.bench.report import CONFIGS, RESULTS, header, model_summary, now, write_report
from tristream.cli import add_engine_args, engine_args
from tristream.model_config import ModelConfig
from tristream.model_files import model_name, resolve_model
from tristream.protocol import SchedulerStats

DEFAULT_CONFIG = CONFIGS / "llama-3-8b.json"
VLLM_REFERENCE = {
    "output_tok_per_s": 11364.0,
    "source": "vLLM's published throughput for Llama-3-8B, dummy weights, 256 in / 256 out, 1000 prompts, one H100",
}
H100_RESULTS = RESULTS / "latency-h100-80gb-hbm3.json"
# The engine flags' defaults in the benchmarks: large batches, no prefix cache, quiet engine processes.
ENGINE_DEFAULTS = dict(max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=False, log_level="WARNING")
COUNTERS = ("num_generated_tokens", "num_steps", "gpu_busy_s", "gpu_idle_s", "scheduler_s", "ipc_s")

Sample = tuple[float, SchedulerStats]


def config_path(config: str) -> pathlib.Path:
    """``config``, or where it names one of bench/configs/ (``llama-3-8b``), that one."""
    path = pathlib.Path(config)
    named = CONFIGS / f"{config}.json"
    return named if not path.exists() and named.is_file() else path


def dummy_model(config: str, max_len: int) -> pathlib.Path:
    """A temporary model folder holding ``config``, with room for ``max_len`` tokens (dummy weights know no limit)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tristream-bench-"))
    raw = json.loads(config_path(config).read_text())
    raw["max_position_embeddings"] = max(raw.get("max_position_embeddings", 0), max_len)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def add_dummy_engine_args(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """The model (--config, run with dummy weights) and the engine's own flags, with ``ENGINE_DEFAULTS`` and
    ``defaults``."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a config.json, run with dummy weights")
    add_engine_args(parser, skip=("model",), load_format="dummy", **{**ENGINE_DEFAULTS, **defaults})


@dataclass
class BenchModel:
    """The model a benchmark runs: the folder the engine loads, its load format and its name in the report."""

    path: str
    load_format: str
    name: str
    dummy: bool

    def close(self) -> None:
        """Remove the temporary folder of a dummy-weight model."""
        if self.dummy:
            shutil.rmtree(self.path, ignore_errors=True)


MODEL_HELP = (
    "a Hugging Face folder, .gguf file or Hub id, run with its weights "
    "(default: the bundled SmolLM2-135M-Instruct, unless --config)"
)


def add_model_args(parser: argparse.ArgumentParser, model_help: str = MODEL_HELP) -> None:
    """``--model`` (real weights) or ``--config`` (dummy weights); with neither, the bundled model."""
    g = parser.add_argument_group("model").add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help=model_help)
    g.add_argument(
        "--config",
        default=None,
        help="a config.json, or the name of one in bench/configs (llama-3-8b, qwen3-8b, ...), run with dummy weights",
    )


def add_bench_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), **defaults: object) -> None:
    """The engine's own flags but ``skip``, with ``ENGINE_DEFAULTS`` and ``defaults``; the model's come from
    ``add_model_args``."""
    add_engine_args(parser, skip=("model", *skip), **{**ENGINE_DEFAULTS, **defaults})


def bench_model(args: argparse.Namespace, max_len: int) -> BenchModel:
    """The model of ``--config`` (a temporary folder with room for ``max_len`` tokens) or of ``--model``."""
    if args.config is not None:
        folder = dummy_model(args.config, max_len)
        return BenchModel(str(folder), "dummy", pathlib.Path(args.config).stem + " (dummy weights)", True)
    load_format = getattr(args, "load_format", "auto")
    path = resolve_model(args.model, load_format, getattr(args, "download_dir", None))
    return BenchModel(path, load_format, model_name(args.model), False)


def resolve_device(args: argparse.Namespace) -> None:
    """Settle --device auto and --dtype auto: bfloat16 on the GPU, float32 on the CPU."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"


def random_prompts(lens: list[int], vocab: int, gen: torch.Generator) -> list[list[int]]:
    """One prompt of random token ids per length."""
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lens]


def vllm_params(max_tokens: int) -> SamplingParams:
    """benchmark_throughput's sampling: temperature 1, top_p 1, every token up to max_tokens."""
    return SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=max_tokens)


def sample_stats(llm: LLM, stop: threading.Event, interval: float, out: list[Sample]) -> None:
    """Append (time, stats) every ``interval`` s until ``stop``; the first call waits until generate runs,
    since from another thread ``get_stats`` must not be the one to start the LLM's loop."""
    while not llm._loop.is_running():
        if stop.wait(0.001):
            return
    while not stop.wait(interval):
        out.append((time.perf_counter(), llm.get_stats()))


def generate(llm: LLM, prompts: list[list[int]], output_lens: list[int], interval: float) -> tuple[dict, list[Sample]]:
    """Run one workload; its figures and the stats samples from its start to its end."""
    before = llm.get_stats()
    stop, samples = threading.Event(), []
    thread = threading.Thread(target=sample_stats, args=(llm, stop, interval, samples))
    start = time.perf_counter()
    thread.start()
    outs = llm.generate(prompts, [vllm_params(n) for n in output_lens], use_tqdm=False)
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    after = llm.get_stats()
    prompt_tokens = sum(map(len, prompts))
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "num_prompts": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "expected_output_tokens": sum(output_lens),
        "wall_s": wall,
        "output_tok_per_s": output_tokens / wall,
        "total_tok_per_s": (prompt_tokens + output_tokens) / wall,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "whole_run": accounting(before, after, wall),
    }
    return result, [(start, before), *samples, (time.perf_counter(), after)]


def accounting(a: SchedulerStats, b: SchedulerStats, seconds: float) -> dict:
    """Step accounting between two stats: GPU idle fraction and means per step."""
    d = {k: getattr(b, k) - getattr(a, k) for k in COUNTERS}
    return summary(d, seconds)


def summary(d: dict, seconds: float) -> dict:
    device = d["gpu_busy_s"] + d["gpu_idle_s"]
    steps = d["num_steps"]
    return {
        "seconds": seconds,
        "generated_tokens": d["num_generated_tokens"],
        "steps": steps,
        "generated_tok_per_s": d["num_generated_tokens"] / seconds if seconds else None,
        "gpu_idle_fraction": d["gpu_idle_s"] / device if device else None,
        **{
            f"{k}_per_step": d[k] / steps if steps else None
            for k in ("gpu_busy_s", "gpu_idle_s", "scheduler_s", "ipc_s")
        },
    }


def steady_intervals(samples: list[Sample], min_running: int) -> list[bool]:
    """Per sampling interval: whether it is steady decode (see the module docstring)."""
    flags = [False] * (len(samples) - 1)
    for i in range(1, len(samples) - 1):
        prev, a, b = samples[i - 1][1], samples[i][1], samples[i + 1][1]
        flags[i] = (
            a.num_running >= min_running
            and b.num_running >= min_running
            and prev.num_prompt_tokens == a.num_prompt_tokens == b.num_prompt_tokens
            and a.num_preemptions == b.num_preemptions
        )
    return flags


def steady_decode(samples: list[Sample], flags: list[bool], wall: float) -> dict | None:
    """Step accounting summed over the steady intervals; None when there are none."""
    pairs = [(samples[i], samples[i + 1]) for i, steady in enumerate(flags) if steady]
    if not pairs:
        return None
    seconds = sum(b[0] - a[0] for a, b in pairs)
    d = {k: sum(getattr(b[1], k) - getattr(a[1], k) for a, b in pairs) for k in COUNTERS}
    return {"intervals": len(pairs), "fraction_of_wall": seconds / wall, **summary(d, seconds)}


def series(samples: list[Sample], flags: list[bool]) -> dict:
    """The samples as columns, times and generated tokens from the run's start."""
    t0, base = samples[0][0], samples[0][1]
    cols = {"t_s": [t - t0 for t, _ in samples]}
    for k in ("num_generated_tokens", "num_steps", "gpu_busy_s", "gpu_idle_s", "num_prompt_tokens"):
        cols[k] = [getattr(s, k) - getattr(base, k) for _, s in samples]
    for k in ("num_running", "num_waiting"):
        cols[k] = [getattr(s, k) for _, s in samples]
    cols["steady_interval"] = flags
    return cols


def workload(llm: LLM, name: str, prompts: list[list[int]], output_lens: list[int], args: argparse.Namespace) -> dict:
    result, samples = generate(llm, prompts, output_lens, args.interval)
    flags = steady_intervals(samples, args.steady_min_running)
    result["steady_decode"] = steady_decode(samples, flags, result["wall_s"])
    result["series"] = series(samples, flags)
    print(f"{name}: {row(result)}", flush=True)
    return result


def compare_runs(llm: LLM, args: argparse.Namespace, vocab: int) -> dict:
    """Exactly B prompts of the fixed lengths, for each batch size B."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    runs = {}
    for b in args.batch_sizes:
        prompts = random_prompts([args.fixed_lens[0]] * b, vocab, gen)
        result, _ = generate(llm, prompts, [args.fixed_lens[1]] * b, args.interval)
        runs[b] = result
        print(f"  batch {b:4d}: {result['output_tok_per_s']:9.1f} output tok/s", flush=True)
    return runs


def warm_up(llm: LLM, vocab: int, args: argparse.Namespace) -> None:
    """Prompts of assorted lengths, a few tokens each: kernels compile here, not in a measured run."""
    gen = torch.Generator().manual_seed(args.seed + 3)
    lens = torch.randint(args.random_range[0], args.random_range[1] + 1, (16,), generator=gen).tolist()
    llm.generate(random_prompts(lens + [args.fixed_lens[0]], vocab, gen), vllm_params(8), use_tqdm=False)


def baseline(args: argparse.Namespace, engine: dict, max_len: int) -> dict | None:
    """The fixed workload (same prompts and seed) on ``--baseline-config``'s model, in an engine of its own."""
    if not args.baseline_config or "fixed" not in args.workloads:
        return None
    folder = dummy_model(args.baseline_config, max_len)
    mc = ModelConfig.load(str(folder))
    prompts = random_prompts(
        [args.fixed_lens[0]] * args.num_prompts, mc.vocab_size, torch.Generator().manual_seed(args.seed + 1)
    )
    with LLM(**{**engine, "model": str(folder), "load_format": "dummy"}) as llm:
        warm_up(llm, mc.vocab_size, args)
        print("baseline:", flush=True)
        fixed = workload(llm, "fixed", prompts, [args.fixed_lens[1]] * args.num_prompts, args)
    shutil.rmtree(folder, ignore_errors=True)
    return {"model_config": args.baseline_config, "model": model_summary(mc, args.dtype), "fixed": fixed}


def target(fixed: dict | None, ceilings: dict | None, gpu: str | None, args: argparse.Namespace) -> dict:
    """The fixed run against vLLM's H100 figure, scaled by copy bandwidth off an H100."""
    out = {
        "reference": VLLM_REFERENCE,
        "comparable": (
            fixed is not None
            and args.fixed_lens == [256, 256]
            and args.num_prompts == 1000
            and args.config is not None
            and config_path(args.config).resolve() == DEFAULT_CONFIG
            and args.dtype == "bfloat16"
        ),
    }
    if fixed is None or ceilings is None:
        return {
            **out,
            "basis": "not computed: needs the fixed workload on a GPU",
            "reference_tok_per_s": None,
            "ratio": None,
        }
    if "H100" in gpu:
        basis, reference = "the published H100 figure as is (this GPU is an H100)", VLLM_REFERENCE["output_tok_per_s"]
    elif not H100_RESULTS.is_file():
        return {**out, "basis": f"not computed: no {H100_RESULTS}", "reference_tok_per_s": None, "ratio": None}
    else:
        h100 = json.loads(H100_RESULTS.read_text())["ceilings"]["copy_bytes_per_s"]
        scale = ceilings["copy_bytes_per_s"] / h100
        basis = (
            f"the H100 figure scaled by this run's copy bandwidth over the H100's ({H100_RESULTS.name}): "
            f"{ceilings['copy_bytes_per_s'] / 1e12:.3f} / {h100 / 1e12:.3f} TB/s"
        )
        reference = VLLM_REFERENCE["output_tok_per_s"] * scale
        out["h100_copy_bytes_per_s"], out["bandwidth_scale"] = h100, scale
    return {**out, "basis": basis, "reference_tok_per_s": reference, "ratio": fixed["output_tok_per_s"] / reference}


def run(args: argparse.Namespace) -> dict:
    """Every workload of ``args`` on the model of ``args``; the report."""
    started = now()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    ceilings = None
    if gpu:
        from tristream.bench.ceilings import bf16_ceilings

        ceilings = bf16_ceilings()
    lo, hi = args.random_range
    max_len = max(2 * hi, sum(args.fixed_lens))
    model = bench_model(args, max_len)
    mc = ModelConfig.load(model.path)
    engine = {
        **engine_args(args),
        "model": model.path,
        "load_format": model.load_format,
        "max_model_len": max_len,
        "max_num_seqs": max(args.max_num_seqs, *args.batch_sizes),
    }
    gen = torch.Generator().manual_seed(args.seed)
    random_in = torch.randint(lo, hi + 1, (args.num_prompts,), generator=gen).tolist()
    random_out = torch.randint(lo, hi + 1, (args.num_prompts,), generator=gen).tolist()
    fixed_gen = torch.Generator().manual_seed(args.seed + 1)
    workloads, compare = {}, {}
    with LLM(**engine) as llm:
        warm_up(llm, mc.vocab_size, args)
        if "random" in args.workloads:
            prompts = random_prompts(random_in, mc.vocab_size, gen)
            workloads["random"] = workload(llm, "random", prompts, random_out, args)
        if "fixed" in args.workloads:
            prompts = random_prompts([args.fixed_lens[0]] * args.num_prompts, mc.vocab_size, fixed_gen)
            workloads["fixed"] = workload(llm, "fixed", prompts, [args.fixed_lens[1]] * args.num_prompts, args)
        if "compare" in args.workloads:
            print("pipelined:", flush=True)
            compare["pipelined"] = compare_runs(llm, args, mc.vocab_size)
    if "compare" in args.workloads:
        with LLM(**{**engine, "pipelined": False}) as llm:
            warm_up(llm, mc.vocab_size, args)
            print("synchronous:", flush=True)
            compare["synchronous"] = compare_runs(llm, args, mc.vocab_size)
    model.close()
    base = baseline(args, engine, max_len)
    pipelined_vs_sync = (
        {
            str(b): {
                "pipelined": compare["pipelined"][b],
                "synchronous": compare["synchronous"][b],
                "gain": compare["pipelined"][b]["output_tok_per_s"] / compare["synchronous"][b]["output_tok_per_s"],
            }
            for b in args.batch_sizes
        }
        if compare
        else None
    )
    return {
        **header("throughput", started),
        "gpu": gpu,
        "model_config": args.config,
        "model": {"name": model.name, **model_summary(mc, args.dtype)},
        "engine": {**engine, "pipelined": True},
        "sampling": "temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output length (vLLM benchmark_throughput)",
        "settings": {
            "workloads": args.workloads,
            "num_prompts": args.num_prompts,
            "random_range": args.random_range,
            "fixed_lens": args.fixed_lens,
            "batch_sizes": args.batch_sizes,
            "seed": args.seed,
            "stats_interval_s": args.interval,
            "steady_min_running": args.steady_min_running,
        },
        "ceilings": ceilings,
        "workloads": workloads,
        "pipelined_vs_synchronous": pipelined_vs_sync,
        "baseline": base,
        "vs_baseline": base and workloads["fixed"]["output_tok_per_s"] / base["fixed"]["output_tok_per_s"],
        "target": target(workloads.get("fixed"), ceilings, gpu, args),
        "definitions": {
            "output_tok_per_s": "generated tokens / wall time of the generate call",
            "total_tok_per_s": "(prompt + generated tokens) / wall time of the generate call",
            "gpu_idle_fraction": "delta gpu_idle_s / (delta gpu_busy_s + delta gpu_idle_s), from LLM.get_stats()",
            "*_per_step": "delta of the counter / delta num_steps",
            "steady_decode": f"sampling intervals with num_running >= {args.steady_min_running} at both ends, no "
            "preemption, and num_prompt_tokens unchanged over the interval and the one before "
            "(no prompt computed in any of its steps); waiting requests allowed",
            "gain": "pipelined output tok/s / synchronous output tok/s, same batch and engine settings",
            "target.ratio": "fixed workload output tok/s / target.reference_tok_per_s",
        },
    }


def row(r: dict) -> str:
    idle = r["whole_run"]["gpu_idle_fraction"]
    steady = r["steady_decode"]
    text = (
        f"{r['wall_s']:7.2f} s  {r['output_tok_per_s']:9.1f} output tok/s  {r['total_tok_per_s']:9.1f} total tok/s"
        f"  GPU idle {pct(idle)}"
    )
    if steady:
        text += f"  steady {steady['generated_tok_per_s']:9.1f} tok/s, GPU idle {pct(steady['gpu_idle_fraction'])}"
    return text


def pct(x: float | None) -> str:
    return f"{100 * x:5.1f}%" if x is not None else "  n/a "


def ms(x: float | None) -> str:
    return f"{1e3 * x:7.3f}" if x is not None else "    n/a"


def plot(report: dict, path: pathlib.Path) -> None:
    """Output tok/s over time per workload (steady decode shaded), with the running requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        s = report["workloads"][name]["series"]
        t, tok = s["t_s"], s["num_generated_tokens"]
        mids = [(a + b) / 2 for a, b in zip(t, t[1:])]
        rate = [(y1 - y0) / (b - a) for a, b, y0, y1 in zip(t, t[1:], tok, tok[1:])]
        ax.plot(mids, rate, "-", color="tab:blue", label="output tok/s")
        for a, b, steady in zip(t, t[1:], s["steady_interval"]):
            if steady:
                ax.axvspan(a, b, color="tab:green", alpha=0.15, lw=0)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("output tok/s")
        ax.set_title(f"{name} (shaded: steady decode)")
        ax.grid(True, alpha=0.3)
        running = ax.twinx()
        running.plot(t, s["num_running"], "--", color="tab:orange", label="running requests")
        running.set_ylabel("running requests")
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(f"{report['gpu'] or 'CPU'}: {report['model']['name']}, {report['model']['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(report: dict) -> None:
    print(f"\n{report['gpu'] or 'CPU'}, {report['model']['name']}, {report['model']['dtype']}")
    if report["ceilings"]:
        c = report["ceilings"]
        print(
            f"ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {c['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s"
        )
    if report["workloads"]:
        print(
            f"{'workload':8} | {'prompts':>7} | {'wall s':>7} | {'output tok/s':>12} | {'total tok/s':>11} | {'GPU idle':>8} | "
            f"{'steady tok/s':>12} | {'steady idle':>11} | {'sched ms/step':>13} | {'ipc ms/step':>11} | {'busy ms/step':>12}"
        )
        for name, r in report["workloads"].items():
            w, s = r["whole_run"], r["steady_decode"] or {}
            steady_tok = f"{s['generated_tok_per_s']:12.1f}" if s else f"{'n/a':>12}"
            print(
                f"{name:8} | {r['num_prompts']:7d} | {r['wall_s']:7.2f} | {r['output_tok_per_s']:12.1f} | "
                f"{r['total_tok_per_s']:11.1f} | {pct(w['gpu_idle_fraction']):>8} | {steady_tok} | "
                f"{pct(s.get('gpu_idle_fraction')):>11} | {ms(w['scheduler_s_per_step']):>13} | "
                f"{ms(w['ipc_s_per_step']):>11} | {ms(w['gpu_busy_s_per_step']):>12}"
            )
    if report["pipelined_vs_synchronous"]:
        print(
            f"\n{'batch':>5} | {'pipelined tok/s':>15} | {'synchronous tok/s':>17} | {'gain':>5} | "
            f"{'idle pipelined':>14} | {'idle synchronous':>16}"
        )
        for b, r in report["pipelined_vs_synchronous"].items():
            p, s = r["pipelined"], r["synchronous"]
            print(
                f"{b:>5} | {p['output_tok_per_s']:15.1f} | {s['output_tok_per_s']:17.1f} | {r['gain']:5.2f} | "
                f"{pct(p['whole_run']['gpu_idle_fraction']):>14} | {pct(s['whole_run']['gpu_idle_fraction']):>16}"
            )
    if report["vs_baseline"] is not None:
        base = report["baseline"]["fixed"]["output_tok_per_s"]
        print(f"\nvs baseline ({report['baseline']['model_config']}, {base:.1f} tok/s): {report['vs_baseline']:.3f}")
    t = report["target"]
    if t["ratio"] is not None:
        print(
            f"\ntarget: fixed {report['workloads']['fixed']['output_tok_per_s']:.1f} / {t['reference_tok_per_s']:.1f} "
            f"tok/s = {t['ratio']:.3f} ({t['basis']}){'' if t['comparable'] else '; NOT the reference workload'}"
        )
    else:
        print(f"\ntarget: {t['basis']}")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of this benchmark."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    add_bench_engine_args(parser, skip_tokenizer_init=True)
    parser.add_argument(
        "--workloads", nargs="+", default=["random", "fixed", "compare"], choices=["random", "fixed", "compare"]
    )
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument(
        "--random-range",
        type=int,
        nargs=2,
        default=[100, 1024],
        metavar=("MIN", "MAX"),
        help="random workload: input and output lengths, each uniform in [MIN, MAX]",
    )
    parser.add_argument(
        "--fixed-lens",
        type=int,
        nargs=2,
        default=[256, 256],
        metavar=("IN", "OUT"),
        help="fixed workload and the pipelined/synchronous batches",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between get_stats() samples")
    parser.add_argument("--steady-min-running", type=int, default=64)
    parser.add_argument(
        "--baseline-config",
        default=None,
        help="a second config.json whose model runs the fixed workload after the first, in the same run: "
        "vs_baseline is the first's output tok/s over its (e.g. a MoE model against bench/configs/llama-3-8b.json)",
    )
    parser.add_argument("--out", default=None, help=f"default: {RESULTS}/throughput-<gpu or cpu>.json")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the benchmark of the command line ``argv``, write its report and print its table; the report."""
    args = build_parser(prog).parse_args(argv)
    resolve_device(args)
    report = run(args)
    write_report(report, "throughput", report["gpu"], args.out, plot if report["workloads"] else None)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
