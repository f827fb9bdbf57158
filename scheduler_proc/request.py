"""The scheduler's view of one request."""

from __future__ import annotations

from dataclasses import dataclass, field

from tristream.protocol import TokenizedRequest


@dataclass
class Request:
    """A request's tokens, pages and progress. ``num_computed`` tokens have KV."""

    spec: TokenizedRequest
    output_token_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    first_scheduled_time: float | None = None

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.spec.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.spec.prompt_token_ids + self.output_token_ids
