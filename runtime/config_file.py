"""YAML config files for the command line: the keys of its flags, plus LLaMA-Factory's names."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

logger = logging.getLogger("tristream")

# LLaMA-Factory's inference keys, by the name of the tristream flag they set.
ALIASES = {
    "model_name_or_path": "model",
    "template": "chat_template",
    "max_new_tokens": "max_tokens",
    "default_system": "system",
}
IGNORED = {"infer_backend": "tristream is its own backend", "trust_remote_code": "tristream runs no remote code"}


def is_config_file(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml"))


def load_config_file(path: str, known: set[str]) -> dict:
    """The flag defaults that a YAML file sets; ``ValueError`` names any key no flag has."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in IGNORED:
            logger.warning("config file %s: %s is ignored (%s)", path, key, IGNORED[name])
            continue
        name = ALIASES.get(name, name)
        if name not in known:
            raise ValueError(f"config file {path}: unknown key {key!r}")
        out[name] = value
    return out
