"""tristream.ray.deployment: the OpenAI-compatible server as a Ray Serve deployment, on one CPU replica."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai
import pytest
from ray import serve

from tests.conftest import hf_greedy  # pytest has imported the conftest under this name
from tristream.model_files import model_name
from tristream.processes import free_port
from tristream.ray import deployment

MODEL = model_name(None)
CHAT = [{"role": "user", "content": "Write a poem about the sea."}]
PROMPT = "The capital of France is"


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].decode(errors="replace")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[1])


def descendant_engine_pids() -> set[int]:
    """The engine processes (titled ``tristream::``) below this process but not its own children (those of an
    engine in this process): those of Ray's workers, and of servers that other tests started."""
    me, found = os.getpid(), set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        pid = int(entry)
        try:
            if not _title(pid).startswith("tristream::") or _parent(pid) == me:
                continue
            ancestor = _parent(pid)
            while ancestor not in (0, 1, me):
                ancestor = _parent(ancestor)
        except OSError:  # gone meanwhile
            continue
        if ancestor == me:
            found.add(pid)
    return found


def still_running(pids: set[int], timeout: float) -> set[int]:
    """Those of ``pids`` still running an engine process after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = set()
        for pid in pids:
            try:
                if _title(pid).startswith("tristream::"):
                    left.add(pid)
            except OSError:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@dataclass
class Served:
    url: str
    client: openai.OpenAI
    engine_pids: set[int]  # the replica's engine processes
    others: set[int]  # engine processes below this one that were there before


@pytest.fixture(scope="module")
def served(local_ray):
    """Ray Serve on the local Ray instance, running one replica of the deployment on the bundled model."""
    port, others = free_port(), descendant_engine_pids()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(device="cpu", max_model_len=512, log_level="WARNING").bind(), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        yield Served(url, client, descendant_engine_pids() - others, others)
    finally:
        serve.shutdown()


def test_bad_engine_argument_fails_at_once():
    with pytest.raises(TypeError, match="unknown engine argument 'max_modle_len'"):
        deployment(max_modle_len=512)
    with pytest.raises(TypeError, match="use tensor_parallel_size"):
        deployment(tp=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        deployment(max_num_seqs=0)
    with pytest.raises(ValueError, match="need 2 GPUs in the replica, but ray_actor_options gives num_gpus=1"):
        deployment(device="cuda", tensor_parallel_size=2, ray_actor_options={"num_gpus": 1})
    with pytest.raises(ValueError, match="default_lora 'x'"):
        deployment(default_lora="x")


def test_deployment_options_follow_the_engine():
    d = deployment(device="cuda", tensor_parallel_size=2, max_num_seqs=16, name="big")
    assert d.name == "big"
    assert d.ray_actor_options == {"num_cpus": 1, "num_gpus": 2}
    assert d.max_ongoing_requests == 32
    autoscaling = d._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 4, 8)
    replicated = deployment(device="cuda", tensor_parallel_size=2, data_parallel_size=2)
    assert replicated.ray_actor_options["num_gpus"] == 4 and replicated.max_ongoing_requests == 256
    assert deployment(device="cuda", tensor_parallel_size=2, distributed_executor="ray").ray_actor_options == {
        "num_cpus": 1,
        "num_gpus": 0,
    }
    fixed = deployment(device="cpu", num_replicas=2, ray_actor_options={"num_cpus": 4})
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    assert fixed.ray_actor_options == {"num_cpus": 4, "num_gpus": 0}


def test_greedy_chat_equals_transformers(served, hf_model, tokenizer):
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    expected = tokenizer.decode(hf_greedy(hf_model, ids, 8), skip_special_tokens=True)
    reply = served.client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)
    choice = reply.choices[0]
    assert choice.message.content == expected != ""
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens == len(ids)


def test_streamed_completion_is_the_whole_one_in_pieces(served):
    whole = served.client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8)
    stream = served.client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, stream=True)
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    pieces = [c.text for c in chunks if c.text]
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].text != ""
    assert chunks[-1].finish_reason == whole.choices[0].finish_reason == "length"


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    with urllib.request.urlopen(served.url + "/health", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(served.url + "/metrics", timeout=10) as r:
        assert "tristream_generation_tokens" in r.read().decode()
    body = json.dumps({"model": MODEL, "prompt": 5}).encode()
    request = urllib.request.Request(served.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400


def test_engine_start_up_failure_fails_the_replica_with_its_cause(served):
    broken = deployment("/nonexistent/model", device="cpu", num_replicas=1, name="broken")
    broken = broken.options(max_constructor_retry_count=1)
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(broken.bind(), name="broken", route_prefix="/broken")
    message = serve.status().applications["broken"].deployments["broken"].message
    assert "model path '/nonexistent/model' does not exist" in message, message
    serve.delete("broken")


def test_shutdown_ends_the_engine_processes(served):
    assert len(served.engine_pids) >= 3, served.engine_pids  # gpu0, tokenizer, scheduler
    serve.shutdown()
    assert not still_running(served.engine_pids, timeout=10.0)
    assert not descendant_engine_pids() - served.others
