"""The sampling defaults of a model's generation_config.json, for requests that leave them out (``generation_config``)."""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tristream import LLM, AsyncEngine, EngineConfig, RequestOutput, SamplingParams
from tristream.cli import parse_args
from tristream.server import build_app

# Greedy and at most 6 tokens, so that a request that runs with them shows it.
DEFAULTS = {"temperature": 0.0, "top_p": 0.9, "top_k": 20, "max_new_tokens": 6}
AS_PARAMS = SamplingParams(temperature=0.0, top_p=0.9, top_k=20, max_tokens=6)
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sampling_model(tmp_path_factory: pytest.TempPathFactory, model_dir: str) -> str:
    """The bundled model, with DEFAULTS in its generation_config.json."""
    folder = tmp_path_factory.mktemp("sampling-model")
    for file in pathlib.Path(model_dir).iterdir():
        if file.name != "generation_config.json":
            (folder / file.name).symlink_to(file)
    generation = json.loads((pathlib.Path(model_dir) / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, **DEFAULTS}))
    return str(folder)


@pytest.fixture(scope="module")
async def sampling_engine(sampling_model: str) -> AsyncIterator[AsyncEngine]:
    async with AsyncEngine(sampling_model, max_model_len=512, log_level="WARNING") as engine:
        yield engine


async def _tokens(stream: AsyncIterator[RequestOutput]) -> list[int]:
    return [token for out in [out async for out in stream] for token in out.outputs[0].token_ids]


async def test_engine_samples_with_the_defaults_unless_given_params(sampling_engine: AsyncEngine) -> None:
    assert sampling_engine.default_sampling_params() == AS_PARAMS
    greedy = SamplingParams(temperature=0, max_tokens=6)
    for run in (sampling_engine.generate, sampling_engine.chat):
        prompt = PROMPT if run == sampling_engine.generate else QUESTION
        expected = await _tokens(run(prompt, greedy))
        assert len(expected) == 6
        assert await _tokens(run(prompt)) == expected
        assert await _tokens(run(prompt, SamplingParams(temperature=0, max_tokens=3))) == expected[:3]


async def test_server_fills_in_what_the_body_leaves_out(
    sampling_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=6)
    chat_text = "".join([o.outputs[0].text async for o in sampling_engine.chat(QUESTION, greedy)])
    text = "".join([o.outputs[0].text async for o in sampling_engine.generate(PROMPT, greedy)])
    transport = httpx.ASGITransport(app=build_app(sampling_engine, "m"))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:

        async def post(path: str, **body: object) -> dict:
            r = await http.post(path, json=body)
            assert r.status_code == 200, r.text
            return r.json()

        chat = await post("/v1/chat/completions", messages=QUESTION)
        assert chat["usage"]["completion_tokens"] == 6
        assert chat["choices"][0]["message"]["content"] == chat_text
        chat = await post("/v1/chat/completions", messages=QUESTION, max_tokens=2, temperature=None)
        assert chat["usage"]["completion_tokens"] == 2
        completion = await post("/v1/completions", prompt=PROMPT)
        assert completion["usage"]["completion_tokens"] == 6
        assert completion["choices"][0]["text"] == text

        monkeypatch.setattr(sampling_engine, "generation_defaults", {"temperature": 0.0})
        completion = await post("/v1/completions", prompt=PROMPT, ignore_eos=True)
        assert completion["usage"]["completion_tokens"] == 16, "OpenAI's default max_tokens, as the model has none"
        assert completion["choices"][0]["text"].startswith(text)


def test_llm_logs_and_returns_the_defaults(sampling_model: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tristream")
    with LLM(sampling_model, max_model_len=512, log_level="WARNING") as llm:
        assert (
            "sampling defaults from the model's generation_config.json, for requests that leave them out: "
            "temperature=0.0, top_p=0.9, top_k=20, max_tokens=6 (generation_config='none' turns them off)"
        ) in caplog.messages
        assert llm.get_default_sampling_params() == AS_PARAMS
        assert len(llm.generate(PROMPT, use_tqdm=False)[0].outputs[0].token_ids) == 6
        assert len(llm.chat(QUESTION, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_generation_config_none_leaves_the_model_defaults_out(
    sampling_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match=r"generation_config must be one of \['auto', 'none'\]"):
        EngineConfig(generation_config="vllm")
    with pytest.raises(RuntimeError, match="once the engine has started"):
        AsyncEngine(sampling_model).default_sampling_params()
    caplog.set_level(logging.INFO, logger="tristream")
    with LLM(sampling_model, max_model_len=512, log_level="WARNING", generation_config="none") as llm:
        assert llm.get_default_sampling_params() == SamplingParams()
    assert not [m for m in caplog.messages if "sampling defaults" in m]


def test_generation_config_flag(capsys: pytest.CaptureFixture) -> None:
    assert parse_args(["serve"]).generation_config == "auto"
    assert parse_args(["serve", "--generation-config", "none"]).generation_config == "none"
    with pytest.raises(SystemExit):
        parse_args(["serve", "--generation-config", "vllm"])
    with pytest.raises(SystemExit):
        parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--generation-config {auto,none} auto: the sampling fields a request leaves out come from the model's" in out
    assert "generation_config.json; none: they do not (default: auto)" in out
