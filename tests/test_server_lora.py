"""LoRA adapters through the server: ``model`` picks an adapter, /v1/models lists them, and they load and
unload at run time when the server allows it, from under its --lora-root."""

from __future__ import annotations

import os
import shutil

import httpx
import openai
import pytest

from tests.conftest import (
    hf_greedy,
    make_lora_adapter,
    start_server,
    stop_server,
)  # pytest has imported the conftest under this name
from tristream.server import build_app

PROMPT = "My favourite thing about winter is"
QUESTION = [{"role": "user", "content": "Write a poem about the sea."}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def expected(tmp_path_factory, model_dir, hf_model, tokenizer) -> dict[str, tuple[str, str, str]]:
    """name -> (adapter directory, greedy completion of PROMPT, greedy answer to QUESTION) under peft's merged model."""
    root = tmp_path_factory.mktemp("adapters")
    prompt = tokenizer(PROMPT).input_ids
    chat = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]

    def answers(model) -> tuple[str, str]:
        return tuple(
            tokenizer.decode(hf_greedy(model, ids, NEW_TOKENS), skip_special_tokens=True) for ids in (prompt, chat)
        )

    out = {"base": ("", *answers(hf_model))}
    for seed, name in enumerate(["qv", "second"]):
        out[name] = (
            str(root / name),
            *answers(
                make_lora_adapter(model_dir, root / name, seed, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
            ),
        )
    return out


@pytest.fixture(scope="module")
def lora_root(expected) -> str:
    """The folder of the adapters, the server's --lora-root."""
    return os.path.dirname(expected["qv"][0])


@pytest.fixture(scope="module")
def server(expected, lora_root):
    server = start_server(
        "--enable-lora-runtime-loading",
        "--lora-root",
        lora_root,
        "--lora-modules",
        f"qv={expected['qv'][0]}",
        "--max-loras",
        "2",
        "--max-model-len",
        "1024",
        "--log-level",
        "WARNING",
    )
    yield server
    stop_server(server)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def complete(server, model: str) -> httpx.Response:
    return post(
        server,
        "/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    )


def test_model_picks_the_adapter(server, expected):
    r = complete(server, "qv")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "qv" and r.json()["choices"][0]["text"] == expected["qv"][1]
    base = complete(server, server.model).json()
    assert base["model"] == server.model and base["choices"][0]["text"] == expected["base"][1]
    assert all(a != b for a, b in zip(expected["qv"][1:], expected["base"][1:])), "the adapter must change the output"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = list(
        client.chat.completions.create(
            model="qv",
            messages=QUESTION,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert {c.model for c in chunks} == {"qv"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["qv"][2]


def test_models_lists_the_adapters_and_the_tokenizer_takes_their_names(server, expected):
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == [server.model, "qv"]
    assert data[1]["parent"] == server.model and data[1]["root"] == expected["qv"][0]
    tokens = post(server, "/tokenize", {"model": "qv", "prompt": PROMPT}).json()["tokens"]
    assert tokens == post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert post(server, "/detokenize", {"model": "qv", "tokens": tokens}).json() == {"prompt": PROMPT}
    r = complete(server, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "nope" in r.json()["error"]["message"] and "`qv`" in r.json()["error"]["message"]


def test_load_use_and_unload_an_adapter(server, expected, lora_root):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": expected["second"][0]})
    assert r.status_code == 200 and "second" in r.text
    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == [server.model, "qv", "second"]
    assert complete(server, "second").json()["choices"][0]["text"] == expected["second"][1] != expected["qv"][1]
    for body, words in [
        ({"lora_name": "third", "lora_path": expected["qv"][0]}, ["slots are taken"]),
        ({"lora_name": "qv", "lora_path": expected["qv"][0]}, ["already loaded"]),
        ({"lora_name": server.model, "lora_path": expected["qv"][0]}, ["served model"]),
        ({"lora_name": "third"}, ["lora_path"]),
    ]:
        r = post(server, "/v1/load_lora_adapter", body)
        assert r.status_code == 400 and all(w in r.json()["error"]["message"] for w in words), r.text
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "second"})
    assert r.status_code == 200 and "second" in r.text
    assert complete(server, "second").status_code == 404
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "second"})
    assert r.status_code == 400 and "no LoRA adapter named 'second'" in r.json()["error"]["message"]
    empty = os.path.join(lora_root, "empty")
    os.makedirs(empty, exist_ok=True)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "empty", "lora_path": empty})
    assert r.status_code == 400 and "no adapter_config.json" in r.json()["error"]["message"]
    assert complete(server, "qv").json()["choices"][0]["text"] == expected["qv"][1], "errors leave the adapters serving"


async def test_default_lora_and_api_key(engine):
    """Requests naming the served model run ``default_lora``; the adapter routes are behind the api key."""
    app = build_app(engine, "m", api_key="k", default_lora="qv", enable_lora_runtime_loading=True)
    auth = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as http:
        body = {"lora_name": "a", "lora_path": "/nowhere"}
        assert (await http.post("/v1/load_lora_adapter", json=body)).status_code == 401
        assert (await http.post("/v1/unload_lora_adapter", json={"lora_name": "a"})).status_code == 401
        for wrong in ["Bearer kk", "Bearer ", "Bearer K", "k", "Basic k", "Bearer k "]:
            r = await http.post("/v1/load_lora_adapter", json=body, headers={"Authorization": wrong})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", wrong
        r = await http.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert r.status_code == 400 and "no LoRA slots" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 2}, headers=auth)
        assert r.status_code == 400 and "unknown LoRA adapter 'qv'" in r.json()["error"]["message"]
        r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "qv"}, headers=auth)
        assert r.status_code == 400 and "default" in r.json()["error"]["message"]


def test_adapter_routes_are_off_without_the_flag(live_server):
    for path, body in [
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"}),
        ("/v1/unload_lora_adapter", {"lora_name": "a"}),
    ]:
        r = post(live_server, path, body)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "lora_runtime_loading_disabled" and "--enable-lora-runtime-loading" in error["message"]
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in error["message"]
    assert [m["id"] for m in httpx.get(live_server.url + "/v1/models").json()["data"]] == [live_server.model]


def test_only_folders_under_the_lora_root_load(server, expected, lora_root, tmp_path):
    outside = str(tmp_path / "outside")
    shutil.copytree(expected["second"][0], outside)
    link = os.path.join(lora_root, "link")
    os.symlink(outside, link)
    try:
        for path in [outside, os.path.join(lora_root, os.path.relpath(outside, lora_root)), link, lora_root + "/.."]:
            r = post(server, "/v1/load_lora_adapter", {"lora_name": "outside", "lora_path": path})
            assert r.status_code == 403, (path, r.text)
            error = r.json()["error"]
            assert error["param"] == "lora_path" and "outside the server's --lora-root" in error["message"], path
    finally:
        os.remove(link)
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == [server.model, "qv"], "a refused path loads nothing"
    assert complete(server, "outside").status_code == 404
    inside = os.path.join(lora_root, "qv", "..", "second")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "inside", "lora_path": inside})
    assert r.status_code == 200, r.text
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[-1]["id"] == "inside" and models[-1]["root"] == os.path.realpath(expected["second"][0])
    assert complete(server, "inside").json()["choices"][0]["text"] == expected["second"][1]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "inside"}).status_code == 200


async def test_lora_root_must_be_a_folder_and_its_absence_is_logged(engine, tmp_path, caplog):
    with pytest.raises(ValueError, match="--lora-root .*no such folder"):
        build_app(engine, "m", enable_lora_runtime_loading=True, lora_root=str(tmp_path / "missing"))
    with caplog.at_level("WARNING", logger="tristream.server"):
        build_app(engine, "m", enable_lora_runtime_loading=True, lora_root=str(tmp_path))
        assert not caplog.messages
        build_app(engine, "m")
        assert not caplog.messages
        build_app(engine, "m", enable_lora_runtime_loading=True)
    assert any("without --lora-root" in m and "any folder" in m for m in caplog.messages)
