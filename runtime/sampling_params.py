"""Per-request sampling parameters."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import InitVar, dataclass, field, fields

MAX_LOGPROBS = 20
# The fields that only sampling has a use for, at the values that switch them off (beam search takes these).
SAMPLING_ONLY_OFF = {
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}

logger = logging.getLogger("tristream")


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain the output to exactly one of: a JSON schema (dict or JSON text),
    any JSON object (``json_object=True``), a regex, an EBNF grammar (GBNF
    syntax, rule ``root``), or one string out of ``choice``.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | list[str] | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured needs exactly one of json, json_object, regex, grammar or choice; got {given or 'none'}"
            )
        if self.choice is not None:
            if (
                isinstance(self.choice, str)
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise ValueError(
                    f"structured.choice must be a non-empty list of non-empty strings, got {self.choice!r}"
                )
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured.{name} must be a non-empty string, got {value!r}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured.json must be a dict or a JSON string, got {type(self.json).__name__}")


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy.

    ``max_tokens=None`` generates until EOS, a stop token, or ``max_model_len``.
    ``top_k=0`` (or vLLM's -1, kept as 0), ``top_p=1`` and ``min_p=0`` switch those filters off; ``min_p`` is
    relative to the most likely token's probability. ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI semantics) count output tokens;
    ``repetition_penalty`` counts prompt and output tokens, dividing a positive
    logit and multiplying a negative one. ``logit_bias`` maps a token id (an int,
    or a string of one as JSON keys are) to a bias in [-100, 100]; any other
    key is a word, and its bias goes on every token the word becomes, with and
    without a leading space. ``allowed_token_ids`` and the tokens of
    ``allowed_words`` (tokenized as logit_bias words) are the only tokens
    sampled, when either is given. EOS and stop tokens are masked until
    ``min_tokens`` tokens.
    ``bad_words`` are never generated, with or without a leading space: the last
    token of a word is banned when the output ends with the tokens before it.
    ``stop`` strings end the output where they appear, across token boundaries;
    they are cut from the text unless ``include_stop_str_in_output``.
    LMDeploy and FastDeploy names are accepted as aliases: ``max_new_tokens``,
    ``min_new_tokens``, ``stop_words`` and ``random_seed``.
    Without a ``seed`` the engine draws one, so every request samples from its
    own reproducible stream. ``logprobs=k`` returns, for every generated token,
    its log-probability and the ``k`` most likely tokens', under the distribution
    it was sampled from (after every processor and filter).
    ``n`` samples share the prompt, which is computed once. ``best_of`` samples
    that many and returns the ``n`` with the highest cumulative logprob, at the
    end rather than streamed. ``prompt_logprobs=k`` returns every prompt token's
    logprob under the model (no processors), with the top ``k``; such a request
    recomputes its prompt instead of reading the prefix cache.
    ``structured`` constrains the output (a StructuredOutput, or a dict of its fields).
    ``lora`` names a loaded LoRA adapter to run the request through (None: the base model).
    ``use_beam_search`` runs a beam search of width ``best_of`` (else ``n``) and returns its ``n`` best
    hypotheses, ranked by cumulative logprob / (prompt + output length) ** ``length_penalty``;
    ``early_stopping`` (True, False or "never") says when it stops, as in vLLM and transformers
    (``tristream.beam_search``). It samples nothing: its candidates are scored by the logprobs of the logits
    after logit_bias and the penalties (counting each beam's own tokens) and, at a temperature above 0, scaled
    and cut by top_k, top_p and min_p; bad_words and structured output are refused with it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int | str, float] | None = None
    allowed_token_ids: list[int] | None = None
    allowed_words: list[str] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    bad_words: list[str] | None = None
    stop: list[str] | str | None = None
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    best_of: int | None = None
    prompt_logprobs: int | None = None
    structured: StructuredOutput | dict | None = None
    lora: str | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    max_new_tokens: InitVar[int | None] = None
    min_new_tokens: InitVar[int | None] = None
    stop_words: InitVar[list[str] | None] = None
    random_seed: InitVar[int | None] = None

    def __post_init__(
        self,
        max_new_tokens: int | None,
        min_new_tokens: int | None,
        stop_words: list[str] | None,
        random_seed: int | None,
    ) -> None:
        for alias, name, value in (
            ("max_new_tokens", "max_tokens", max_new_tokens),
            ("min_new_tokens", "min_tokens", min_new_tokens),
            ("stop_words", "stop", stop_words),
            ("random_seed", "seed", random_seed),
        ):
            if value is None:
                continue
            current = getattr(self, name)
            if current not in (None, 0, []) and current != value:
                raise ValueError(f"{alias}={value!r} conflicts with {name}={current!r}: give one of them")
            setattr(self, name, value)
        self._check_floats()
        self._check_counts()
        self._check_lists()
        self._check_allowed()
        self._check_beam_search()

    def _check_floats(self) -> None:
        """Temperature, the filters, the penalties and logit_bias: finite and in range."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k == -1 and isinstance(self.top_k, int):
            self.top_k = 0
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {_bias_key(k): float(v) for k, v in dict(self.logit_bias).items()}
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"logit_bias must map token ids or non-blank words to numbers, got {self.logit_bias!r}"
                ) from e
            bad = {k: v for k, v in self.logit_bias.items() if (isinstance(k, int) and k < 0) or not -100 <= v <= 100}
            if bad:
                raise ValueError(f"logit_bias needs token ids >= 0 and finite biases in [-100, 100], got {bad!r}")

    def _check_counts(self) -> None:
        """Token counts, logprobs, samples, the seed, the output constraint and the adapter."""
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}], got {value!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            raise ValueError(f"best_of must be an int >= n ({self.n}), got {self.best_of!r}")
        if isinstance(self.structured, dict):
            try:
                self.structured = StructuredOutput(**self.structured)
            except TypeError as e:
                raise ValueError(f"structured: {e}") from e
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput or a dict, got {type(self.structured).__name__}")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise ValueError(f"lora must be an adapter name, got {self.lora!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def _check_lists(self) -> None:
        """Stop strings, bad words and stop token ids, as lists."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        self.bad_words = list(self.bad_words or [])
        if not all(isinstance(x, str) and x.strip() for x in self.bad_words):
            raise ValueError(f"bad_words must be non-blank strings, got {self.bad_words!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")

    def _check_allowed(self) -> None:
        """The allowed tokens: non-empty lists of token ids >= 0 and of non-blank words."""
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            ids = self.allowed_token_ids
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids >= 0, got {ids!r}")
        if self.allowed_words is not None:
            self.allowed_words = list(self.allowed_words)
            words = self.allowed_words
            if not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"allowed_words must be a non-empty list of non-blank strings, got {words!r}")

    def _check_beam_search(self) -> None:
        """The beam search fields, and no field that only sampling has a use for alongside beam search."""
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f'early_stopping must be true, false or "never", got {self.early_stopping!r}')
        if not self.use_beam_search:
            for name, given in (("length_penalty", self.length_penalty != 1), ("early_stopping", self.early_stopping)):
                if given:
                    raise ValueError(f"{name} applies only to beam search (use_beam_search)")
            return
        refused = ["bad_words"] * bool(self.bad_words) + ["structured"] * (self.structured is not None)
        if refused:
            raise ValueError(
                f"{', '.join(refused)}: beam search does not take these (it scores every candidate by its logprob)"
            )

    @property
    def beam_width(self) -> int:
        """How many beams a beam search keeps: ``best_of`` if given, else ``n``."""
        return self.best_of or self.n

    @property
    def step_logprobs(self) -> int | None:
        """How many top logprobs each generated token reports: ``logprobs``, and for beam search at least
        twice the beam width, its candidates."""
        if not self.use_beam_search:
            return self.logprobs
        return max(2 * self.beam_width, self.logprobs or 0)

    @property
    def penalized(self) -> bool:
        """Whether a presence, frequency or repetition penalty is on (its token counts change every step)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def word_biases(self) -> dict[str, float]:
        """The logit_bias entries keyed by a word, which the tokenizer turns into token ids."""
        return {k: v for k, v in (self.logit_bias or {}).items() if isinstance(k, str)}

    @property
    def num_samples(self) -> int:
        """How many sequences the engine keeps apart: ``best_of`` if given, else ``n``; a beam search's ``n``
        hypotheses (its beams rank inside the engine)."""
        return self.n if self.use_beam_search else self.best_of or self.n


def _bias_key(key: int | str) -> int | str:
    """A logit_bias key as a token id, or as a word when it is a string that does not read as an integer."""
    if isinstance(key, bool):
        raise TypeError("a logit_bias key must be a token id or a word")
    try:
        return int(key)
    except ValueError:
        if key.strip():
            return key
        raise


@dataclass
class GenerationConfig(SamplingParams):
    """LMDeploy-style sampling parameters: greedy unless ``do_sample=True``.

    Every SamplingParams field and alias (``max_new_tokens``, ``stop_words``,
    ``random_seed``, ``bad_words``, ...) works here too. Sampling fields given
    without ``do_sample`` are logged once, as LMDeploy logs it, and have no effect.
    """

    do_sample: bool = False

    def __post_init__(self, *aliases: object) -> None:
        super().__post_init__(*aliases)
        if not self.do_sample:
            if self.temperature not in (0, 1) or self.top_p != 1 or self.top_k not in (0, 1) or self.min_p != 0:
                _log_greedy()
            self.temperature = 0.0


@functools.cache
def _log_greedy() -> None:
    logger.warning(
        "GenerationConfig sets temperature, top_p, top_k or min_p, but do_sample is False: decoding is greedy, "
        "as in LMDeploy; pass do_sample=True to sample"
    )
