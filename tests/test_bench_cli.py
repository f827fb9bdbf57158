"""``tristream bench latency | serve`` end to end on the bundled model, on the CPU."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import wait_gone  # pytest has imported the conftest under this name
from tristream.bench.report import CONFIGS
from tristream.bench.serving import arrival_delays
from tristream.bench.serving_client import split_limit
from tristream.bench.throughput import config_path
from tristream.cli import parse_args

TIMEOUT = 120
PERCENTILES = ("mean", "p50", "p90", "p99")


def bench(*args: str) -> dict:
    """Run ``python -m tristream bench ARGS --out FILE`` on one thread; the report it wrote."""
    out = args[args.index("--out") + 1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "tristream", "bench", *args], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def check_latencies(r: dict) -> None:
    """Every latency figure is there, positive and in percentile order; a request's TTFT is within its E2E."""
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(r[key]) == set(PERCENTILES), key
        assert all(r[key][p] > 0 for p in PERCENTILES), key
        assert r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"], key
    assert r["ttft_s"]["p99"] < r["e2e_s"]["p99"]
    assert r["request_throughput"] == pytest.approx(r["completed"] / r["duration_s"])
    assert r["output_tok_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])


def test_bench_arguments_go_to_the_benchmark():
    args = parse_args(["bench", "serve", "--base-url", "http://h:1", "--rates", "4", "inf", "--help"])
    assert (args.command, args.benchmark) == ("bench", "serve")
    assert args.bench_argv == ["--base-url", "http://h:1", "--rates", "4", "inf", "--help"]


def test_bench_help_lists_the_benchmarks():
    run = subprocess.run(
        [sys.executable, "-m", "tristream", "bench", "--help"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert run.returncode == 0
    assert all(f"    {name} " in run.stdout for name in ("latency", "throughput", "serve"))


def test_a_config_may_be_named():
    assert config_path("llama-3-8b") == CONFIGS / "llama-3-8b.json"
    assert config_path(str(CONFIGS / "qwen3-8b.json")) == CONFIGS / "qwen3-8b.json"


def test_arrivals_and_in_flight_limits_are_deterministic():
    assert arrival_delays(4.0, 5, random.Random(0)) == arrival_delays(4.0, 5, random.Random(0))
    assert arrival_delays(float("inf"), 3, random.Random(0)) == [0.0, 0.0, 0.0]
    assert split_limit(10, 4) == [3, 3, 2, 2]
    assert split_limit(None, 2) == [None, None]


def test_bench_latency_on_the_bundled_model(tmp_path):
    out = tmp_path / "latency.json"
    report = bench(
        "latency", "--device", "cpu", "--batch-sizes", "1", "2", "--input-lens", "16", "--output-len", "4",
        "--prefill-len", "32", "--out", str(out),
    )  # fmt: skip
    assert report["model"]["name"] == "SmolLM2-135M-Instruct" and report["model"]["dtype"] == "float32"
    assert report["model_config"] is None and report["ceilings"] is None and report["device"] is None
    assert [(r["batch"], r["input_len"], r["output_len"]) for r in report["decode"]] == [(1, 16, 4), (2, 16, 4)]
    for r in report["decode"]:
        assert 0 < r["ttft_p50_s"] < r["wall_s"] and 0 < r["tpot_incl_prefill_s"] < r["wall_s"]
        assert r["output_tok_per_s"] == pytest.approx(r["batch"] * 4 / r["wall_s"])
        assert r["roofline_tpot_s"] is None and r["roofline_fraction"] is None
    # One request decodes alone from its first token to its last (two may not overlap on a busy CPU).
    assert 0 < report["decode"][0]["tpot_s"] < report["decode"][0]["wall_s"]
    (prefill,) = report["prefill"]
    assert prefill["prompt_tokens"] == 32 and prefill["tokens_per_s"] == pytest.approx(32 / prefill["ttft_s"])


def test_bench_serve_starts_its_own_server(tmp_path):
    out = tmp_path / "serving.json"
    report = bench(
        "serve", "--device", "cpu", "--rates", "inf", "--num-requests", "4", "--input-len", "16",
        "--output-len", "6", "--client-processes", "2", "--out", str(out),
    )  # fmt: skip
    assert report["server"]["started_here"] and report["model"]["name"] == "SmolLM2-135M-Instruct"
    r = report["results"]["inf"]
    assert (r["num_requests"], r["completed"], r["failed"]) == (4, 4, 0)
    assert r["output_tokens"] == 4 * 6
    assert abs(r["prompt_tokens"] - 4 * 16) <= 4
    check_latencies(r)
    shares = {s["name"]: s for s in r["cpu_share"]}
    expected = {"tristream serve", "tristream::tokenizer", "tristream::scheduler", "tristream::gpu0"}
    assert expected | {"client 0", "client 1"} <= set(shares)
    assert shares["tristream::gpu0"]["cpu_share"] > 0 and shares["client 0"]["cpu_share"] > 0
    assert not wait_gone([s["pid"] for s in r["cpu_share"]]), "the benchmark left processes behind"
    assert out.is_file()


def test_bench_serve_drives_a_running_server(tmp_path, model_dir, scrape, live_server):
    before = scrape(live_server).get("tristream_generation_tokens_total{}", 0)
    report = bench(
        "serve", "--base-url", live_server.url, "--tokenizer", model_dir, "--rates", "inf", "--num-requests", "4",
        "--input-len", "16", "--output-len", "5", "--concurrency", "2", "--out", str(tmp_path / "remote.json"),
    )  # fmt: skip
    # The warm-up's 4 requests of 5 tokens, then the 4 measured ones.
    assert scrape(live_server)["tristream_generation_tokens_total{}"] - before == 8 * 5
    assert report["server"] == {"base_url": live_server.url, "started_here": False}
    assert report["model"] == {"name": live_server.model} and "as text" in report["prompts"]
    r = report["results"]["inf"]
    assert (r["completed"], r["output_tokens"]) == (4, 4 * 5)
    check_latencies(r)
    assert {s["name"] for s in r["cpu_share"]} == {"client 0", "client 1"}


def test_bench_serve_sends_token_ids_without_a_tokenizer(tmp_path, live_server):
    report = bench(
        "serve", "--base-url", live_server.url + "/v1", "--tokenizer", str(tmp_path / "none"), "--rates", "inf",
        "--num-requests", "2", "--input-len", "8", "--output-len", "3", "--out", str(tmp_path / "ids.json"),
    )  # fmt: skip
    assert report["prompts"] == "random token ids under 32000, sent as lists"
    r = report["results"]["inf"]
    assert (r["completed"], r["output_tokens"], r["prompt_tokens"]) == (2, 2 * 3, 2 * 8)


def test_bench_speculative_checks_drafts_and_gives_the_greedy_output(tmp_path):
    """The oracle draft right every time (p=1) has every one of its k=2 drafts accepted; one never right (p=0)
    none; the run itself fails if speculation changed the greedy output."""
    report = bench(
        "speculative", "--device", "cpu", "--batch-sizes", "2", "--max-k", "1", "--k", "2", "--accept", "0", "1",
        "--input-len", "8", "--output-len", "7", "--out", str(tmp_path / "spec.json"),
    )  # fmt: skip
    [verify] = report["verify"]
    assert (verify["batch"], verify["k"]) == (2, 1) and verify["vs_decode"] > 0
    never, always = report["acceptance"]
    assert never["mean_accepted_length"] == 1 and always["mean_accepted_length"] == 3
    assert always["speedup"] > 0 and report["model"]["name"] == "SmolLM2-135M-Instruct"


def test_bench_data_parallel_routes_conversations_to_their_cache(tmp_path, tiny_model):
    """Each turn of a conversation goes back to the replica holding its history, so the prefix router hits the
    cache more often than round-robin does on the same workload."""
    report = bench(
        "data-parallel", "--config", os.path.join(tiny_model, "config.json"), "--device", "cpu", "--parts", "routing",
        "--systems", "2", "--conversations", "2", "--turns", "3", "--system-len", "64", "--turn-len", "16",
        "--answer-len", "16", "--out", str(tmp_path / "dp.json"),
    )  # fmt: skip
    prefix, round_robin = report["routing"]["runs"]["prefix"], report["routing"]["runs"]["round_robin"]
    assert prefix["prompt_tokens"] == round_robin["prompt_tokens"] == 4 * (3 * 64 + 16 * (1 + 2 + 3) + 16 * (0 + 1 + 2))
    assert prefix["hit_rate"] > round_robin["hit_rate"] and report["routing"]["vs_round_robin"] > 0
