"""Speculative decoding's settings: how draft tokens are proposed, how many, and up to which batch size."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model

METHODS = ("ngram", "draft", "eagle3")
# Other engines' names for a method or a key, as their documentation writes them.
METHOD_ALIASES = {"draft_model": "draft", "[ngram]": "ngram", "EAGLE3": "eagle3"}
KEY_ALIASES = {
    "num_speculative_tokens": "num_tokens",
    "speculative_num_draft_tokens": "num_tokens",
    "speculative_draft_model_path": "model",
}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: each step, a request proposes up to ``num_tokens`` draft tokens and the model checks
    them all in one forward pass, keeping the longest prefix that it would have produced itself.

    ``method``: "ngram" proposes the tokens that followed the most recent earlier occurrence of the context's last
    ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens (no extra weights); "draft" runs the smaller model
    ``model`` (same tokenizer) greedily; "eagle3" runs the EAGLE-3 head ``model`` on the model's own hidden states. Speculation pauses while ``disable_by_batch_size`` or more requests run:
    at large batches a step is no longer bound by reading the weights, and checking drafts costs more than it saves.
    """

    method: str
    num_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    disable_by_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            hint = " (of EAGLE heads, EAGLE-3's are supported)" if "eagle" in str(self.method).lower() else ""
            raise ValueError(f"speculative method must be one of {list(METHODS)}, got {self.method!r}{hint}")
        for name in ("num_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative {name} must be an int >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative prompt_lookup_min ({self.prompt_lookup_min}) is above prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )
        if self.method in ("draft", "eagle3") and not (isinstance(self.model, str) and self.model):
            raise ValueError(f"speculative method {self.method!r} needs the draft's directory (or Hub id) as 'model'")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative method 'ngram' uses no draft model; leave 'model' out")


def parse_speculative(value: Any) -> SpeculativeConfig | None:
    """A SpeculativeConfig from a mapping or its JSON text (vLLM's and SGLang's key names are taken too); None stays
    None. A mapping without a method but with a model is a draft model's. ``ValueError`` says what is wrong."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the speculative config {value!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f'the speculative config must be a mapping like {{"method": "ngram"}}, got {value!r}')
    items = {KEY_ALIASES.get(key, key): v for key, v in value.items()}
    if "method" not in items and "model" in items:
        items["method"] = "draft"
    if "method" not in items:
        raise ValueError(f"the speculative config needs a method ({', '.join(METHODS)}), got {value!r}")
    items["method"] = METHOD_ALIASES.get(items["method"], items["method"])
    known = SpeculativeConfig.__dataclass_fields__
    unknown = [key for key in items if key not in known]
    if unknown:
        raise ValueError(f"unknown speculative config keys {unknown}; the keys are: {', '.join(known)}")
    return SpeculativeConfig(**items)


def resolve_draft(
    spec: SpeculativeConfig, target: ModelConfig, max_len: int, load_format: str, download_dir: str | None, tp: int
) -> SpeculativeConfig:
    """``spec`` with its draft model resolved to a directory (a .gguf file converted, a Hub id downloaded), once
    the draft is known to fit the model ``target`` at ``max_len`` tokens. ``ValueError`` says why it does not."""
    if spec.method == "ngram":
        return spec
    if tp > 1:
        raise ValueError(f"method {spec.method!r} does not run under tensor parallelism yet: use 'ngram', or tp=1")
    if spec.method == "eagle3":
        from tristream.gpu_proc.eagle3 import head_config  # the gpu_proc's, read here so that start-up fails early

        path = resolve_model(spec.model, "auto", download_dir)
        head_config(path, target)
        return dataclasses.replace(spec, model=path)
    path = resolve_model(spec.model, load_format, download_dir)
    draft = ModelConfig.load(path)
    if draft.vocab_size > target.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({draft.vocab_size}) is larger than the model's ({target.vocab_size}): "
            "a draft model must share the model's tokenizer"
        )
    if draft.max_position_embeddings < max_len:
        raise ValueError(
            f"the draft model holds {draft.max_position_embeddings} positions, fewer than max_model_len={max_len}"
        )
    return dataclasses.replace(spec, model=path)
