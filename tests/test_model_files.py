"""Tests for locating and converting model files."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest
import torch

from tristream import model_files
from tristream.cli import parse_args
from tristream.model_files import cache_root, default_model_path, generation_defaults, model_name, resolve_model


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
    assert len(messages) == 2
    assert messages[0] == f"converting {gguf} once into {first}"
    assert re.fullmatch(r"converted tiny\.gguf in \d+\.\d s", messages[1])
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


def test_missing_path_raises_file_not_found(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_model(missing)
    assert missing in str(excinfo.value)
    monkeypatch.chdir(tmp_path)
    for relative in ("no-such-model", "./no/such-model", "../no-such-model"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model(relative)


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


COMMIT = "0123456789abcdef0123456789abcdef01234567"
# A Hub repository: the files the engine reads, and some that it does not (other formats, docs, subfolders).
REPO = {
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b'{"temperature": 0.6}',
    "model.safetensors": b"weights",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "merges.txt": b"",
    "chat_template.jinja": b"{{ messages }}",
    "README.md": b"# tiny",
    "pytorch_model.bin": b"other weights",
    "onnx/model.safetensors": b"other weights",
}
ENGINE_FILES = sorted(
    ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    + ["merges.txt", "chat_template.jinja"]
)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """Answers the calls huggingface_hub's snapshot_download makes for the model ``org/tiny``; 404 for the rest."""

    requests: list[str]

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        path = self.path.split("?")[0]
        file = path.removeprefix(f"/org/tiny/resolve/{COMMIT}/")
        if path == "/api/models/org/tiny/revision/main":
            self._send(json.dumps({"id": "org/tiny", "sha": COMMIT}).encode())
        elif path == f"/api/models/org/tiny/tree/{COMMIT}":
            tree = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in REPO.items()
            ]
            self._send(json.dumps(tree).encode())
        elif file in REPO:
            self._send(REPO[file], {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(REPO[file]).hexdigest()}"'})
        else:
            self._send(b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, status=404)

    def _send(self, body: bytes, headers: dict[str, str] | None = None, status: int = 200) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_hub() -> Iterator[tuple[str, list[str]]]:
    """``(endpoint, requests)``: a local Hub endpoint serving ``org/tiny``, and the requests it got for models."""
    requests: list[str] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_HubHandler,), {"requests": requests}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()
    server.server_close()


def _closed_endpoint() -> str:
    """An address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _resolve_in_child(model: str, env: dict[str, str], load_format: str = "auto", download_dir: str = "") -> tuple:
    """``resolve_model`` in a fresh Python whose huggingface_hub reads ``env``: (exit status, stdout, stderr)."""
    code = "import sys; from tristream.model_files import resolve_model; print(resolve_model(*sys.argv[1:3], sys.argv[3] or None))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    r = subprocess.run(
        [sys.executable, "-c", code, model, load_format, download_dir],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.returncode, r.stdout.strip(), r.stderr


def _model_requests(requests: list[str], repo: str) -> list[str]:
    return [r for r in requests if f"/{repo}/" in r]


def test_hub_id_downloads_only_the_files_the_engine_reads(tmp_path: pathlib.Path, stub_hub) -> None:
    endpoint, requests = stub_hub
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    status, out, err = _resolve_in_child("org/tiny", env)
    assert status == 0, err
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    assert out == str(snapshot)
    assert sorted(os.listdir(snapshot)) == ENGINE_FILES
    assert all((snapshot / name).read_bytes() == REPO[name] for name in ENGINE_FILES)
    assert f"Fetching {len(ENGINE_FILES)} files" in err, "the progress bar"
    assert not [r for r in requests if re.search(r"README|pytorch_model|onnx", r)]

    requests.clear()
    assert _resolve_in_child("org/tiny", env)[1] == out
    assert not _model_requests(requests, "org/tiny"), "the second start reads the cache, with no network call"

    status, out, err = _resolve_in_child("org/tiny", env, download_dir=str(tmp_path / "models"))
    assert status == 0, err
    assert out == str(tmp_path / "models" / "models--org--tiny" / "snapshots" / COMMIT)


def _write_cached_snapshot(hub_cache: pathlib.Path, repo: str, weights: bool = True) -> pathlib.Path:
    """A model in Hugging Face's cache layout: models--org--name/snapshots/<commit>/ and refs/main."""
    folder = hub_cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    if weights:
        (snapshot / "model.safetensors").write_bytes(b"")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_hub_id_in_the_cache_resolves_without_the_network(tmp_path: pathlib.Path, stub_hub) -> None:
    endpoint, requests = stub_hub
    snapshot = _write_cached_snapshot(tmp_path / "hf" / "hub", "org/cached")
    for env in ({"HF_HOME": str(tmp_path / "hf")}, {"HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}):
        status, out, err = _resolve_in_child("org/cached", {"HF_ENDPOINT": endpoint, **env})
        assert (status, out) == (0, str(snapshot)), err
    assert not _model_requests(requests, "org/cached"), "the stub would have answered 404"

    config_only = _write_cached_snapshot(tmp_path / "hf" / "hub", "org/config-only", weights=False)
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    assert _resolve_in_child("org/config-only", env, load_format="dummy")[:2] == (0, str(config_only))
    status, _, err = _resolve_in_child("org/config-only", env)
    assert _model_requests(requests, "org/config-only"), "the weights are not in the cache: it asked the Hub"
    assert status != 0 and f"{config_only} has no *.safetensors weights" in err, "which has not got them either"


def test_hub_id_that_cannot_be_downloaded_is_an_error_naming_it(tmp_path: pathlib.Path, stub_hub) -> None:
    endpoint, _ = stub_hub
    missing = "HuggingFaceTB/SmolLM2-135M-Instruct-does-not-exist"
    for where, model in ((endpoint, missing), (_closed_endpoint(), "org/tiny")):
        status, _, err = _resolve_in_child(model, {"HF_ENDPOINT": where, "HF_HOME": str(tmp_path / "hf")})
        assert status != 0
        assert f"FileNotFoundError: model {model!r} is not a local path, and downloading it from" in err


def test_modelscope_downloads_when_asked(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool, dict]] = []

    def snapshot_download(model_id: str, local_files_only: bool = False, **options: object) -> str:
        calls.append((model_id, local_files_only, options))
        folder = tmp_path / "modelscope" / model_id
        folder.mkdir(parents=True, exist_ok=True)
        if not local_files_only:
            (folder / "config.json").write_text("{}")
            (folder / "model.safetensors").write_bytes(b"")
        return str(folder)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("TRISTREAM_USE_MODELSCOPE", "1")
    folder = str(tmp_path / "modelscope" / "Qwen" / "Qwen3-8B")
    assert resolve_model("Qwen/Qwen3-8B", download_dir=str(tmp_path / "models")) == folder
    assert [call[:2] for call in calls] == [("Qwen/Qwen3-8B", True), ("Qwen/Qwen3-8B", False)]
    assert calls[1][2]["cache_dir"] == str(tmp_path / "models")
    assert "*.safetensors" in calls[1][2]["allow_patterns"]
    calls.clear()
    assert resolve_model("Qwen/Qwen3-8B") == folder
    assert [call[:2] for call in calls] == [("Qwen/Qwen3-8B", True)], "complete in its cache: no download"

    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(ImportError, match="TRISTREAM_USE_MODELSCOPE=1 .* pip install modelscope"):
        resolve_model("Qwen/Qwen3-8B")


def test_model_name_of_a_hub_id_is_the_id(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    (tmp_path / "org" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_name("org/local") == "local", "a local directory keeps its folder name"
    assert model_name(None) == "SmolLM2-135M-Instruct"


def test_conversion_is_announced_in_the_users_process(tmp_path: pathlib.Path) -> None:
    """A cold start shows the engine's own conversion line on stderr, at the default log level."""
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not really gguf")
    r = subprocess.run(
        [sys.executable, "-c", "import sys; from tristream import LLM; LLM(sys.argv[1])", str(gguf)],
        env={**os.environ, "TRISTREAM_CACHE": str(tmp_path / "cache")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    target = re.escape(str(tmp_path / "cache" / "gguf" / "broken-"))
    assert re.search(
        rf"^\d\d:\d\d:\d\d tristream INFO converting {re.escape(str(gguf))} once into {target}\w+$", r.stderr, re.M
    )


def test_generation_defaults_read_the_sampling_fields(tmp_path: pathlib.Path, converted_dir: pathlib.Path) -> None:
    assert generation_defaults(str(converted_dir)) == {}, "the bundled model has none: it samples as tristream does"
    assert generation_defaults(str(tmp_path)) == {}
    config = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(
        json.dumps({**config, "max_new_tokens": 64, "do_sample": True, "eos_token_id": 2})
    )
    assert generation_defaults(str(tmp_path)) == {**config, "max_tokens": 64}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="generation_config.json: temperature must be >= 0"):
        generation_defaults(str(tmp_path))


def test_download_dir_flag(capsys: pytest.CaptureFixture) -> None:
    args = parse_args(["serve", "Qwen/Qwen3-8B", "--download-dir", "/models"])
    assert (args.model, args.download_dir) == ("Qwen/Qwen3-8B", "/models")
    assert parse_args(["serve"]).download_dir is None
    with pytest.raises(SystemExit):
        parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "--download-dir DOWNLOAD_DIR where Hub models are looked up and downloaded (default: the Hugging Face cache)"
        in out
    )
