"""Shared fixtures: one engine and one transformers model for the whole session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

import torch
from prometheus_client.parser import text_string_to_metric_families

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; it must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tristream import AsyncEngine  # noqa: E402
from tristream.model_files import resolve_model  # noqa: E402


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache, one prompt at a time."""
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([ids], device=model.device), use_cache=True)
        for _ in range(n):
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            res = model(
                torch.tensor([[token]], device=model.device), past_key_values=res.past_key_values, use_cache=True
            )
    return out


def make_lora_adapter(model_dir: str, path, seed: int, scale: float = 0.05, **lora: object):
    """Save a PEFT LoRA adapter of ``model_dir`` with random A and B (times ``scale``) to ``path``;
    return peft's merged model of it, in fp32 on the CPU."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(path))
    return model.merge_and_unload().eval()


@pytest.fixture(scope="session")
def model_dir() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
async def engine():
    async with AsyncEngine(max_model_len=1024, check_invariants=True, log_level="WARNING") as eng:
        yield eng


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def alive():
    """``alive(pid)``: True while the process runs (a zombie counts as gone)."""
    return _alive


@dataclass
class LiveServer:
    """A ``tristream serve`` subprocess on the bundled model."""

    url: str
    proc: subprocess.Popen
    model: str
    log: list[str]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False


def start_server(*args: str, timeout: float = 180.0) -> LiveServer:
    """Run ``tristream serve --port 0 ARGS`` and wait until it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tristream", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"serving (\S+) at (http://\S+)/v1", line)
        if m:
            # Keep draining the output so that the server never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return LiveServer(m.group(2), proc, m.group(1), lines)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("tristream serve did not start:\n" + "".join(lines))


def stop_server(server: LiveServer) -> None:
    """SIGTERM, and a kill (and a failure) if the server has not exited 30 s later."""
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


@pytest.fixture(scope="session")
def live_server():
    """One server on the bundled model for every HTTP test."""
    server = start_server("--max-model-len", "1024", "--log-level", "WARNING")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def scrape():
    """``scrape(server)``: its /metrics samples, by name and labels (``model_name`` left out)."""

    def read(server: LiveServer) -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples

    return read
