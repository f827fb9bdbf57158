"""The scheduler's view of one request."""

from __future__ import annotations

from dataclasses import dataclass, field

from tristream.protocol import TokenizedRequest
from tristream.scheduler_proc.radix_cache import Node

IMAGE_KEY_MASK = (1 << 62) - 1


@dataclass
class Request:
    """A request's tokens, pages and progress. ``num_computed`` tokens have KV.

    ``pages`` is its block table; it owns ``own_pages`` of them, and the radix
    cache owns the rest, held for it by a lock on ``cache_node`` (KVPages changes
    all three). ``num_pending`` tokens are being sampled in steps still in flight;
    the steps planned meanwhile count them as known (``num_planned``). A step in flight
    checks ``num_drafts`` draft tokens of it, whose positions ``num_computed`` counts until
    the result says how many were accepted.

    Under sliding-window attention the entries of ``pages`` before ``window_page``
    lie wholly before the window of every query still to come: those it owned
    were freed and are 0 there (KVPages.drop_out_of_window).
    """

    spec: TokenizedRequest
    output_token_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    own_pages: set[int] = field(default_factory=set)
    cache_node: Node | None = None
    window_page: int = 0
    num_computed: int = 0
    num_pending: int = 0
    num_drafts: int = 0
    num_cached_tokens: int | None = None
    first_scheduled_time: float | None = None
    prompt_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    cache_prompt: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache_prompt = cache_keys(self.spec)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.spec.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.spec.prompt_token_ids + self.output_token_ids

    @property
    def cache_token_ids(self) -> list[int]:
        """``all_token_ids`` as the prefix cache keys them (``cache_keys``)."""
        return self.cache_prompt + self.output_token_ids

    @property
    def cache_namespace(self) -> int:
        """Its prefix cache tree: its LoRA adapter's id, or 0."""
        return self.spec.lora.id if self.spec.lora else 0

    @property
    def num_planned(self) -> int:
        return self.num_tokens + self.num_pending

    @property
    def computes_whole_prompt(self) -> bool:
        """Whether it starts from no cached prefix: it wants prompt logprobs, or it embeds its prompt (pooled
        hidden states need every token's, which cached pages do not hold)."""
        return self.spec.params.prompt_logprobs is not None or self.spec.pooling is not None


def finish_reason(spec: TokenizedRequest, token: int, num_outputs: int, num_tokens: int, max_len: int) -> str | None:
    """Why a request ends whose newest token is ``token``, with ``num_outputs`` output tokens and ``num_tokens`` in
    all: "stop" (EOS or a stop token), "length" (``max_tokens`` or ``max_len``), or None while it goes on."""
    params = spec.params
    if (not params.ignore_eos and token in spec.eos_token_ids) or token in params.stop_token_ids:
        return "stop"
    if params.max_tokens is not None and num_outputs >= params.max_tokens:
        return "length"
    if num_tokens >= max_len:
        return "length"
    return None


def cache_keys(spec: TokenizedRequest) -> list[int]:
    """The prompt's token ids with each image's tokens made negative numbers derived from the image's digest and
    their place in it, so that the prefix cache tells images apart where their placeholder ids are the same."""
    if not spec.images:
        return spec.prompt_token_ids
    keys = list(spec.prompt_token_ids)
    for image in spec.images:
        keys[image.offset : image.offset + image.length] = [
            -1 - ((image.digest + j) & IMAGE_KEY_MASK) for j in range(image.length)
        ]
    return keys
