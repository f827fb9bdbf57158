"""An ms-swift-style front door: chat with a history of ``(query, response)`` pairs.

``inference`` and ``inference_stream`` take an ``LLM`` (synchronous) or an
``AsyncEngine`` (awaitable, async generator), and then either the query, or as
ms-swift 2 does, a ``Template`` (``get_template``) and then the query. For a
vision-language model, ``images=[...]`` (paths, URLs or PIL images) go where the
queries' ``<image>`` tags are, in order. The default sampling is the model's
``generation_config`` when it has one (``get_model_tokenizer``), else greedy
(temperature 0) with at most 512 new tokens, a deterministic answer of bounded
length; pass ``sampling_params`` for anything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tristream.engine import AsyncEngine
from tristream.llm import LLM
from tristream.outputs import RequestOutput
from tristream.sampling_params import GenerationConfig, SamplingParams
from tristream.tokenizer_proc.templates import resolve_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

History = list[tuple[str, str]]
HistoryIn = Sequence[tuple[str, str] | list[str]] | None
Printer = Callable[[RequestOutput], None] | None
Content = str | list[dict]

# ms-swift's mark of where an image goes in a query.
IMAGE_TAG = "<image>"

DEFAULT_PARAMS = SamplingParams(temperature=0, max_tokens=512)


@dataclass
class Template:
    """A chat template for ``inference`` (ms-swift's ``get_template``).

    ``template_type`` names a built-in template or a Jinja file (``chat_template``); None is the
    model's own. ``default_system`` is the system prompt of turns that give none.
    """

    template_type: str | None
    tokenizer: PreTrainedTokenizerBase | None = None
    default_system: str | None = None
    chat_template_kwargs: dict | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.template_type is not None:
            self.chat_template_kwargs = {"chat_template": resolve_chat_template(self.template_type)}


@dataclass
class _Turn:
    """One prepared turn: the query after the past turns, as chat messages, and how to sample the reply."""

    query: str
    past: History
    messages: list[dict]
    params: SamplingParams
    chat_template_kwargs: dict | None

    def history(self, response: str) -> History:
        return [*self.past, (self.query, response)]


def get_model_tokenizer(
    model_type_or_path: str | None, torch_dtype: object = None, model_kwargs: dict | None = None, **engine_args: object
) -> tuple[LLM, PreTrainedTokenizerBase]:
    """ms-swift's loader: an ``LLM`` of a model directory or .gguf file (None: the bundled model), and its tokenizer.

    ``torch_dtype`` (a torch dtype or its name) is the engine's ``dtype``. Of ``model_kwargs`` only
    ``device_map`` has a meaning here: ``"auto"``, ``"cpu"`` or ``"cuda"``, the engine's ``device``.
    ``model.generation_config`` is a transformers GenerationConfig, from the model's
    generation_config.json (at most 512 new tokens unless it says otherwise): what ``inference``
    samples with when given no ``sampling_params``.
    """
    from transformers import GenerationConfig as HFGenerationConfig  # transformers loads only when asked for

    extra = dict(model_kwargs or {})
    device = extra.pop("device_map", "auto")
    if extra:
        raise ValueError(f"model_kwargs {sorted(extra)} have no meaning here: give engine arguments as keywords")
    if torch_dtype is not None:
        engine_args["dtype"] = str(torch_dtype).removeprefix("torch.")
    llm = LLM(model_type_or_path, device=device, **engine_args)
    model_dir = Path(llm.engine.child_config.model)
    found = (model_dir / "generation_config.json").is_file()
    llm.generation_config = HFGenerationConfig.from_pretrained(model_dir) if found else HFGenerationConfig()
    llm.generation_config.max_new_tokens = llm.generation_config.max_new_tokens or DEFAULT_PARAMS.max_tokens
    return llm, llm.get_tokenizer()


def get_default_template_type(model_type_or_path: str | None) -> None:
    """ms-swift's template of a model type: here always None, the model's own chat template."""
    return None


def get_template(
    template_type: str | None, tokenizer: PreTrainedTokenizerBase | None = None, default_system: str | None = None
) -> Template:
    """ms-swift's ``get_template``: a ``Template`` for ``inference`` (a ValueError for an unknown name)."""
    return Template(template_type, tokenizer, default_system)


def inference(
    engine_or_llm: LLM | AsyncEngine, *args: object, verbose: bool = False, stream: bool = False, **kwargs: object
) -> tuple[str, History] | Awaitable[tuple[str, History]]:
    """Answer a query after a history; return ``(response, history + [(query, response)])``.

    The arguments after the engine are ``query, history=None, system=None, sampling_params=None``,
    with ms-swift's ``template`` before them if given, and as keywords its ``generation_config`` (a
    transformers GenerationConfig) and ``images``: paths, URLs or PIL images, one for each ``<image>``
    tag of the history's queries and the query, in order; the images beyond the tags go before the
    first query, as ms-swift places them. ``verbose`` prints the rendered prompt and the reply, as it
    streams with ``stream``. The input history is left as it is. With an ``AsyncEngine`` this returns
    an awaitable: ``response, history = await inference(engine, query)``.
    """
    turn = _prepare(engine_or_llm, args, kwargs)
    printer = _Verbose(stream) if verbose else None
    if isinstance(engine_or_llm, AsyncEngine):
        return _ainference(engine_or_llm, turn, printer)
    result = "", turn.history("")
    for result in _stream(engine_or_llm, turn, printer):  # noqa: B007 (the last step is the answer)
        pass
    return result


def inference_stream(
    engine_or_llm: LLM | AsyncEngine, *args: object, **kwargs: object
) -> Iterator[tuple[str, History]] | AsyncIterator[tuple[str, History]]:
    """Yield ``(response_so_far, history)`` as the answer grows; history ends with ``(query, response_so_far)``.

    The arguments are ``inference``'s. A generator with an ``LLM``, an async generator with an ``AsyncEngine``.
    """
    turn = _prepare(engine_or_llm, args, kwargs)
    if isinstance(engine_or_llm, AsyncEngine):
        return _astream(engine_or_llm, turn, None)
    return _stream(engine_or_llm, turn, None)


def conversation(query: Content, past: Sequence[tuple[Content, str]], system: str | None = None) -> list[dict]:
    """The chat messages of ``query`` after the ``(query, response)`` turns of ``past``, and a system prompt.
    A query is text or message content parts (``image_content``)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for q, r in past:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return [*messages, {"role": "user", "content": query}]


def image_content(text: str, images: Sequence, tag: str) -> Content:
    """The message content of ``text`` with an image at each ``tag``, in order: text and image parts, or the
    text itself when it has no images. A ValueError unless the tags are as many as the images."""
    pieces = text.split(tag)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{text!r} has {len(pieces) - 1} {tag} tags for {len(images)} images")
    if not images:
        return text
    parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for image, piece in zip(images, pieces[1:]):
        parts += [{"type": "image", "image": image}, *([{"type": "text", "text": piece}] if piece else [])]
    return parts


def _tagged_queries(queries: list[str], images: Sequence) -> list[Content]:
    """Each query's content with its images, as ms-swift reads them: each ``<image>`` tag of the queries takes
    the next image, and the images beyond the tags go before the first query."""
    tags = sum(query.count(IMAGE_TAG) for query in queries)
    if tags > len(images):
        raise ValueError(f"the queries have {tags} {IMAGE_TAG} tags for {len(images)} images")
    queries = [IMAGE_TAG * (len(images) - tags) + queries[0], *queries[1:]]
    contents, start = [], 0
    for query in queries:
        end = start + query.count(IMAGE_TAG)
        contents.append(image_content(query, images[start:end], IMAGE_TAG))
        start = end
    return contents


def _prepare(engine_or_llm: object, args: tuple, kwargs: dict) -> _Turn:
    """The turn of either call form: ms-swift's puts a ``Template`` before the query."""
    if args and isinstance(args[0], Template):
        return _turn(engine_or_llm, args[0], *args[1:], **kwargs)
    return _turn(engine_or_llm, Template(None), *args, **kwargs)


def _turn(
    engine_or_llm: object,
    template: Template,
    query: str,
    history: HistoryIn = None,
    system: str | None = None,
    sampling_params: SamplingParams | None = None,
    *,
    generation_config: object = None,
    images: Sequence | None = None,
) -> _Turn:
    """Check the arguments and prepare the turn: the history as pairs, the messages and the parameters."""
    if not isinstance(engine_or_llm, (LLM, AsyncEngine)):
        raise TypeError(f"engine_or_llm must be a tristream LLM or AsyncEngine, got {type(engine_or_llm).__name__}")
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string or None, got {type(system).__name__}")
    if history is not None and not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of (query, response) pairs, got {history!r}")
    past: History = []
    for i, pair in enumerate(history or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise ValueError(f"history[{i}] must be a (query, response) pair of strings, got {pair!r}")
        past.append((pair[0], pair[1]))
    if generation_config is None:
        generation_config = getattr(engine_or_llm, "generation_config", None)
    params = sampling_params
    if params is None:
        params = DEFAULT_PARAMS if generation_config is None else _sampling_params(generation_config)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    if params.num_samples != 1:
        raise ValueError("a chat turn has one response: n and best_of must be 1")
    system = system if system is not None else template.default_system
    if images is not None and not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of paths, URLs or PIL images, got {type(images).__name__}")
    queries = [q for q, _ in past] + [query]
    contents = _tagged_queries(queries, images) if images else queries
    messages = conversation(contents[-1], list(zip(contents, [r for _, r in past])), system)
    return _Turn(query, past, messages, params, template.chat_template_kwargs)


def _sampling_params(config: object) -> SamplingParams:
    """The parameters of a transformers GenerationConfig: greedy unless ``do_sample``, as transformers decodes."""
    sampled = {name: getattr(config, name) for name in ("temperature", "top_p", "top_k")} if config.do_sample else {}
    return GenerationConfig(
        do_sample=bool(config.do_sample),
        max_new_tokens=config.max_new_tokens or DEFAULT_PARAMS.max_tokens,
        repetition_penalty=config.repetition_penalty or 1.0,
        **{name: value for name, value in sampled.items() if value is not None},
    )


@dataclass
class _Verbose:
    """Prints a turn as ms-swift's ``verbose=True``: ``[PROMPT]``, the rendered prompt, ``[OUTPUT]`` and the reply,
    as it streams when ``stream``."""

    stream: bool
    reply: str | None = None

    def __call__(self, out: RequestOutput) -> None:
        if self.reply is None:
            print(f"[PROMPT]{out.prompt}[OUTPUT]", end="", flush=True)
            self.reply = ""
        self.reply += out.outputs[0].text
        if self.stream:
            print(out.outputs[0].text, end="", flush=True)
        if out.finished:
            print("" if self.stream else self.reply)


async def _ainference(engine: AsyncEngine, turn: _Turn, printer: Printer) -> tuple[str, History]:
    result = "", turn.history("")
    async for result in _astream(engine, turn, printer):  # noqa: B007 (the last step is the answer)
        pass
    return result


async def _astream(engine: AsyncEngine, turn: _Turn, printer: Printer) -> AsyncIterator[tuple[str, History]]:
    response = ""
    deltas = engine.chat(turn.messages, turn.params, chat_template_kwargs=turn.chat_template_kwargs)
    async with contextlib.aclosing(deltas):
        async for out in deltas:
            response += out.outputs[0].text
            if printer is not None:
                printer(out)
            yield response, turn.history(response)


def _stream(llm: LLM, turn: _Turn, printer: Printer) -> Iterator[tuple[str, History]]:
    response = ""
    with contextlib.closing(llm.stream_chat(turn.messages, turn.params, turn.chat_template_kwargs)) as deltas:
        for _, out in deltas:
            response += out.outputs[0].text
            if printer is not None:
                printer(out)
            yield response, turn.history(response)
