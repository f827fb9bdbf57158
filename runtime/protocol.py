"""Every message that crosses a process boundary, and their serialization.

Data path: user -> tokenizer_proc -> scheduler_proc -> gpu_proc, and back.
Each process owns one ZMQ PULL inbox; peers PUSH typed messages into it. A step's plan
travels as a diff (``tristream.plan_codec``).
"""

from __future__ import annotations

import dataclasses
import operator
import pickle
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

from tristream.outputs import ToolCall, merge_tool_calls
from tristream.sampling_params import SamplingParams


@dataclass
class Ipc:
    """The address of every process's inbox (one per tokenizer worker, and one plan channel per tensor-parallel
    rank that the scheduler binds), the ``HOST:PORT`` of the store where the ranks' process group meets
    (``tristream.rendezvous``), and the folder of image payloads."""

    user: str
    tokenizers: list[str]
    scheduler: str
    gpu: list[str]
    rendezvous: str
    media: str = ""


def _pickled_as_values(cls: type) -> type:
    """Pickle a dataclass of which every step sends many as its field values in order, not a dict by name:
    a quarter of the time to unpickle."""
    values = operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))
    cls.__reduce__ = lambda self: (cls, values(self))
    return cls


def sample_request_id(request_id: str, index: int) -> str:
    """The scheduler's id of sample ``index`` of a request (``n > 1``): the request's own for sample 0."""
    return request_id if index == 0 else f"{request_id}#{index}"


def tokenizer_process_name(worker: int) -> str:
    """``tokenizer`` for worker 0, then ``tokenizer1``, ``tokenizer2``..."""
    return f"tokenizer{worker}" if worker else "tokenizer"


def tokenizer_worker(request_id: str, num_workers: int) -> int:
    """The tokenizer worker that owns a request (all its samples): a hash of its id, the same in every process."""
    return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) % num_workers


def gpu_process_name(rank: int) -> str:
    """``gpu`` for tensor-parallel rank 0 (the one that samples), then ``gpu1``, ``gpu2``..."""
    return f"gpu{rank}" if rank else "gpu"


@dataclass(frozen=True)
class LoraRef:
    """A loaded LoRA adapter: ``id`` (never reused) keys the prefix cache, ``slot`` is where
    the gpu_procs hold its matrices."""

    id: int
    slot: int


@dataclass(frozen=True)
class Pooling:
    """An embedding request: it samples nothing, and ends with its prompt's final-norm hidden states pooled by
    ``method`` ("last": the last token's, "mean": their mean over every prompt token), L2-normalized if ``normalize``."""

    method: str
    normalize: bool


# user -> tokenizer_proc


@dataclass
class ToolSpec:
    """A chat's tools (OpenAI's function ``tools``) and its ``tool_choice``: "none", "auto", "required", or
    "function" for the function named ``function``. ``parallel`` lets a reply make more than one call."""

    tools: list
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    @classmethod
    def of(cls, tools: list | None, tool_choice: str | dict | None, parallel: bool = True) -> ToolSpec | None:
        """The spec of OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``; None without tools."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise ValueError("tool_choice needs tools")
            return None
        if tool_choice is None or tool_choice in ("none", "auto", "required"):
            return cls(tools, tool_choice or "auto", parallel=parallel)
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            )
        return cls(tools, "function", function["name"], parallel)


@dataclass
class GenerateRequest:
    """A new request: exactly one of ``prompt``, ``prompt_token_ids`` or ``messages``;
    ``lora`` is the adapter that ``params.lora`` names. ``images`` are its images in prompt order (encoded
    bytes, a local path or a PIL image), one for each ``{"type": "image"}`` part of ``messages`` or each image
    placeholder of the prompt. ``suffix``, with a text ``prompt``, asks for the text between the two (fill in the
    middle). With ``pooling`` it is an embedding request."""

    request_id: str
    params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    suffix: str | None = None
    chat_template_kwargs: dict | None = None
    lora: LoraRef | None = None
    images: list | None = None
    tools: ToolSpec | None = None
    pooling: Pooling | None = None


@dataclass
class AbortRequest:
    """Stop a request and free its pages. Travels user -> tokenizer -> scheduler; ``worker`` is the tokenizer
    worker that owns it."""

    request_id: str
    worker: int = 0


@dataclass
class StopRequest:
    """The tokenizer found a stop string: finish the request without another delta."""

    request_id: str


@dataclass
class Shutdown:
    """Ask a child process to exit."""


# tokenizer_proc -> scheduler_proc -> gpu_proc


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image of a prompt: its pixel values (float32 of ``shape``) in the file ``path``, its grid of
    patches (t, h, w) where the model has one, the prompt positions ``offset:offset + length`` of its tokens, and
    ``digest``, a hash of its pixels that keys its tokens in the prefix cache."""

    path: str
    shape: tuple[int, ...]
    grid: tuple[int, int, int] | None
    offset: int
    length: int
    digest: int


@dataclass
class TokenizedRequest:
    """A validated request in token ids; ``params.seed`` is always set here.

    One of the ``n`` samples of a request names the first sample in ``fork_of``:
    it waits for that one's prompt to be computed, then starts from a copy of its KV.
    ``grammar`` is a structured output constraint as (kind, text), for the gpu_proc.
    ``images`` are the prompt's images; their files live until the request ends.
    ``pooling`` makes it an embedding request. ``worker`` is the tokenizer worker that sent it, which takes
    its deltas.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    bad_words_ids: list[list[int]] = field(default_factory=list)
    fork_of: str | None = None
    grammar: tuple[str, str] | None = None
    lora: LoraRef | None = None
    images: list[ImageInput] = field(default_factory=list)
    pooling: Pooling | None = None
    worker: int = 0


# scheduler_proc -> gpu_proc


@dataclass
class NewSequence:
    """A request entering a gpu slot. ``token_ids`` are all its known tokens.

    ``num_cached`` tokens already sit in its pages; ``num_outputs`` of the tokens
    are earlier outputs (a request resumed after preemption). ``lora_slot`` is its
    LoRA adapter's slot, or -1 for the base model. ``images`` are its prompt's images.
    ``pooling`` makes it an embedding request.
    """

    slot: int
    token_ids: list[int]
    num_cached: int
    num_outputs: int
    params: SamplingParams
    bad_words_ids: list[list[int]] = field(default_factory=list)
    grammar: tuple[str, str] | None = None
    lora_slot: int = -1
    images: list[ImageInput] = field(default_factory=list)
    pooling: Pooling | None = None


@dataclass
class BeamFork:
    """A beam's next token, chosen by the scheduler: slot ``slot`` continues the sequence of slot ``source``
    (itself, or the beam it branches from) with ``token`` as its newest, not yet computed, token. It keeps the
    first ``num_shared_pages`` of ``source``'s pages; its others come in ``BatchPlan.pages``, after it."""

    slot: int
    source: int
    token: int
    num_shared_pages: int


@dataclass
class BatchPlan:
    """One step, as a diff against the gpu_proc's slot state.

    ``slots[i]`` computes ``num_tokens[i]`` of its not yet computed tokens and,
    when ``sample[i]``, samples the next token from the last one. A slot's first
    token may be one that the gpu_proc sampled in the step before and the scheduler
    has not seen yet. ``copies`` are (source, destination) KV pages to copy before
    the step runs. ``beams`` set the newest token of beam search slots, whose sampled token
    is never fed forward; they apply after ``new`` and before ``pages``. ``after_idle`` says the scheduler had nothing to run before this
    step, so the device's wait for it is not idle time; ``sent_at`` is the
    ``time.monotonic()`` of sending. The rows reach the gpu_proc in the plan codec's order.
    """

    step_id: int
    new: list[NewSequence] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)
    pages: list[tuple[int, list[int]]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    beams: list[BeamFork] = field(default_factory=list)
    after_idle: bool = False
    sent_at: float = 0.0


# gpu_proc -> scheduler_proc


@dataclass
class StepResult:
    """The tokens sampled in one step, for the slots that sampled, in the order of the plan the gpu_proc ran.

    ``logprobs[i]``, for a slot that asked, is [(sampled token, its logprob), then the top ones].
    ``prompt_logprobs`` holds, per slot that asked, the same for each prompt token
    this step computed the logits before (in prompt order).
    ``gpu_busy_s`` is the device time of the step, ``gpu_idle_s`` the device time idle
    since the previous step, ``plan_ipc_s`` the plan's time in transit, and ``sent_at``
    the ``time.monotonic()`` of sending this result. ``embeddings`` are (slot, pooled vector) of the embedding
    requests whose prompt this step completed. A slot that checked draft tokens has a row for each token it
    produced, in order, and (slot, drafts proposed) in ``drafts``.
    """

    step_id: int
    slots: list[int]
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_logprobs: list[tuple[int, list[list[tuple[int, float]]]]] = field(default_factory=list)
    gpu_busy_s: float = 0.0
    gpu_idle_s: float = 0.0
    plan_ipc_s: float = 0.0
    sent_at: float = 0.0
    embeddings: list[tuple[int, list[float]]] = field(default_factory=list)
    drafts: list[tuple[int, int]] = field(default_factory=list)


# scheduler_proc -> tokenizer_proc


@_pickled_as_values
@dataclass
class TokenDelta:
    """New token ids of one request; ``finish_reason`` or ``error`` ends it. An embedding request ends with its
    ``embedding``. ``worker`` is the tokenizer worker that owns the request."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    time_in_queue: float | None = None
    error: str | None = None
    logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[list[tuple[int, float]]] | None = None
    embedding: list[float] | None = None
    worker: int = 0


@dataclass
class TokenBatch:
    """The token deltas of one step for one tokenizer worker: those of the requests it owns."""

    deltas: list[TokenDelta]


# tokenizer_proc -> user


@_pickled_as_values
@dataclass
class OutputDelta:
    """Text and ids since the last delta of sample ``index`` of one request.

    ``finished`` ends this sample; ``reasoning`` is text split off by the reasoning parser, and ``tool_calls``
    the call deltas of a chat with tools (None without). The first delta of a chat sample carries the rendered
    conversation in ``prompt``. An embedding request's one delta carries its ``embedding``.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    num_cached_tokens: int = 0
    time_in_queue: float | None = None
    error: str | None = None
    logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[list[tuple[int, float]]] | None = None
    index: int = 0
    reasoning: str = ""
    prompt: str | None = None
    tool_calls: list[ToolCall] | None = None
    embedding: list[float] | None = None

    def then(self, later: OutputDelta) -> OutputDelta | None:
        """This delta and ``later``, the next of its request, as one; None where they must stay apart: other
        samples, an end or an error before ``later``, an error in it, an embedding or prompt logprobs, or
        logprobs in only one of them."""
        if (
            later.index != self.index
            or self.finished
            or self.error is not None
            or later.error is not None
            or self.embedding is not None
            or later.embedding is not None
            or later.prompt_logprobs is not None
            or (self.logprobs is None) != (later.logprobs is None)
        ):
            return None
        calls = self.tool_calls
        if later.tool_calls is not None:
            calls = merge_tool_calls(merge_tool_calls([], calls or []), later.tool_calls)
        return dataclasses.replace(
            self,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            finished=later.finished,
            finish_reason=later.finish_reason,
            logprobs=None if self.logprobs is None else self.logprobs + later.logprobs,
            reasoning=self.reasoning + later.reasoning,
            tool_calls=calls,
            prompt_token_ids=self.prompt_token_ids or later.prompt_token_ids,
            prompt=self.prompt or later.prompt,
        )


@dataclass
class OutputBatch:
    """The output deltas of one tokenizer worker's turn; ``busy_s`` is that worker's time handling messages since
    it started (``SchedulerCounters.tokenizer_busy_s``)."""

    deltas: list[OutputDelta]
    worker: int = 0
    busy_s: float = 0.0


# user <-> tokenizer_proc


@dataclass
class TokenizeCall:
    """Tokenize ``prompt`` or ``messages``, or detokenize ``token_ids``; answered by TokenizeResult(token).

    With ``pieces`` the answer also holds each token's own text.
    """

    token: int
    prompt: str | None = None
    messages: list[dict] | None = None
    chat_template_kwargs: dict | None = None
    add_special_tokens: bool = True
    token_ids: list[int] | None = None
    pieces: bool = False


@dataclass
class TokenizeResult:
    token: int
    token_ids: list[int] | None = None
    text: str | None = None
    pieces: list[str] | None = None
    error: str | None = None


# user <-> scheduler_proc


@dataclass
class StatsRequest:
    """Ask the scheduler for its counters."""

    token: int


@dataclass
class SchedulerCounters:
    """The scheduler's totals since start.

    ``num_generated_tokens`` counts the output tokens handed on. Step accounting, summed over
    ``num_steps`` steps: ``gpu_busy_s`` the device time of the steps (forward and sampling),
    ``gpu_idle_s`` the device time between consecutive steps while requests were running (the engine's
    ``get_stats`` widens it to all the time a request was in flight and no step ran),
    ``scheduler_s`` the scheduler's time deciding steps and taking their results, ``ipc_s`` the
    time plans and results spent in transit between the scheduler and the gpu_proc. ``tokenizer_busy_s`` is the
    tokenizer workers' time handling messages (detokenizing steps, tokenizing prompts), summed over the workers;
    the engine adds it from their ``OutputBatch`` reports. Speculative decoding: ``num_drafts`` request-steps
    checked ``num_draft_tokens`` draft tokens, of which the model accepted ``num_accepted_tokens``.
    """

    num_prompt_tokens: int = 0
    num_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0
    gpu_busy_s: float = 0.0
    gpu_idle_s: float = 0.0
    scheduler_s: float = 0.0
    ipc_s: float = 0.0
    tokenizer_busy_s: float = 0.0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """The share of proposed draft tokens that the model accepted."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per step of a request that proposed drafts: its accepted drafts plus the model's own."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass(kw_only=True)
class SchedulerStats(SchedulerCounters):
    """The scheduler's KV pages and queues now, and its counters, in answer to ``StatsRequest(token)``."""

    token: int
    num_pages: int
    num_free_pages: int
    num_running: int
    num_waiting: int
    num_cached_pages: int


# user -> scheduler_proc -> every gpu_proc -> user


@dataclass
class LoadLora:
    """Load the PEFT adapter at ``path`` into ``slot``; each rank answers LoraLoaded(token)."""

    token: int
    slot: int
    path: str


@dataclass
class LoraLoaded:
    token: int
    rank: int
    error: str | None = None


# lifecycle: children -> user (and gpu_proc rank 0 -> scheduler_proc)


@dataclass
class GpuReady:
    """Tensor-parallel rank ``rank`` finished start-up with ``num_pages`` KV pages (page 0 included)."""

    rank: int
    num_pages: int
    device: str
    dtype: str

    @property
    def process(self) -> str:
        return gpu_process_name(self.rank)


@dataclass
class TokenizerReady:
    """Tokenizer worker ``worker`` finished start-up."""

    has_chat_template: bool
    worker: int = 0

    @property
    def process(self) -> str:
        return tokenizer_process_name(self.worker)


@dataclass
class SchedulerReady:
    """The scheduler finished start-up."""

    process: ClassVar[str] = "scheduler"


@dataclass
class ProcessFailed:
    """A child process hit an exception; ``error`` is its traceback."""

    process: str
    error: str


def encode(message: object) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> object:
    return pickle.loads(data)
