"""Tests for locating and converting model files."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time

import pytest
import torch

from tristream import model_files
from tristream.model_files import cache_root, default_model_path, resolve_model


@pytest.fixture(scope="session")
def converted_dir() -> pathlib.Path:
    """The bundled model as a Hugging Face directory; converted at most once (cached on disk)."""
    return pathlib.Path(resolve_model(None))


def test_default_model_path_is_the_bundled_gguf() -> None:
    path = pathlib.Path(default_model_path())
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert "SmolLM2-135M-Instruct" in path.name


def test_default_resolves_to_llama_dir(converted_dir: pathlib.Path) -> None:
    assert converted_dir.is_dir()
    assert converted_dir.parent == cache_root() / "gguf"
    assert converted_dir.name.startswith(pathlib.Path(default_model_path()).stem + "-")
    assert (converted_dir / "model.safetensors").is_file()
    assert (converted_dir / "tokenizer.json").is_file()
    config = json.loads((converted_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True


def test_converted_dir_loads_and_matches_gguf(converted_dir: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gguf = pathlib.Path(default_model_path())
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_second_call_reuses_cache(
    converted_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_conversion(gguf: pathlib.Path, out: pathlib.Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(model_files, "_write_hf_dir", no_conversion)
    mtime = (converted_dir / "model.safetensors").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="tristream")
    start = time.perf_counter()
    again = resolve_model(None)
    assert time.perf_counter() - start < 1.0
    assert again == str(converted_dir)
    assert (converted_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [r for r in caplog.records if "converting" in r.getMessage()]


def _fake_writer(gguf: pathlib.Path, out: pathlib.Path) -> None:
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "source": str(gguf)}))
    (out / "model.safetensors").write_bytes(b"")


def test_gguf_converted_once_into_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TRISTREAM_CACHE", str(tmp_path / "cache"))
    calls: list[pathlib.Path] = []

    def writer(gguf: pathlib.Path, out: pathlib.Path) -> None:
        calls.append(out)
        _fake_writer(gguf, out)

    monkeypatch.setattr(model_files, "_write_hf_dir", writer)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    caplog.set_level(logging.INFO, logger="tristream")

    first = pathlib.Path(resolve_model(str(gguf)))
    assert first.parent == tmp_path / "cache" / "gguf"
    assert first.name.startswith("tiny-")
    assert json.loads((first / "config.json").read_text())["source"] == str(gguf)
    messages = [r.getMessage() for r in caplog.records if r.name == "tristream"]
    assert messages == [f"converting {gguf} once into {first}"]
    assert os.listdir(first.parent) == [first.name]

    assert resolve_model(str(gguf)) == str(first)
    assert len(calls) == 1

    gguf.write_bytes(b"GGUF, modified")
    assert resolve_model(str(gguf)) != str(first)
    assert len(calls) == 2


def test_gguf_conversion_race_keeps_first_result(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRISTREAM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    target = model_files._gguf_cache_dir(gguf)

    def writer_losing_the_race(gguf: pathlib.Path, out: pathlib.Path) -> None:
        _fake_writer(gguf, out)
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "llama", "winner": True}))

    monkeypatch.setattr(model_files, "_write_hf_dir", writer_losing_the_race)
    assert resolve_model(str(gguf)) == str(target)
    assert json.loads((target / "config.json").read_text())["winner"] is True
    assert os.listdir(target.parent) == [target.name]


def test_failed_conversion_leaves_nothing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRISTREAM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not really gguf")

    def failing_writer(gguf: pathlib.Path, out: pathlib.Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("unreadable")

    monkeypatch.setattr(model_files, "_write_hf_dir", failing_writer)
    with pytest.raises(RuntimeError, match="unreadable"):
        resolve_model(str(gguf))
    assert os.listdir(tmp_path / "cache" / "gguf") == []


def test_missing_path_raises_file_not_found(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_model(missing)
    assert missing in str(excinfo.value)
    with pytest.raises(FileNotFoundError, match="Hub model ids are not supported"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct-does-not-exist")


def test_dir_without_safetensors(
    converted_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(converted_dir / "config.json", config_only / "config.json")

    with pytest.raises(ValueError) as excinfo:
        resolve_model(str(config_only))
    assert str(config_only) in str(excinfo.value)

    monkeypatch.chdir(tmp_path)
    assert resolve_model("config-only", load_format="dummy") == str(config_only)


def test_dir_with_weights_is_returned_as_is(converted_dir: pathlib.Path) -> None:
    assert resolve_model(str(converted_dir)) == str(converted_dir)


def test_unusable_inputs_raise_value_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(weights))
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(None, load_format="pt")


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("TRISTREAM_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("TRISTREAM_CACHE")
    assert cache_root() == pathlib.Path.home() / ".cache" / "tristream"
