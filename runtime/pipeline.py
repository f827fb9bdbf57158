"""An LMDeploy-style front door: ``pipeline(...)``, ``Response`` and chat ``Session``s, on ``LLM``."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tristream.chat import Content, conversation, image_content
from tristream.config import EngineConfig
from tristream.llm import LLM
from tristream.lmdeploy import IMAGE_TOKEN, BackendConfig
from tristream.outputs import RequestOutput, accumulate
from tristream.sampling_params import GenerationConfig, SamplingParams
from tristream.tokenizer_proc.templates import resolve_chat_template

Messages = list[dict]
# LMDeploy's prompt of a vision-language model: text and an image or a list of them (PIL images, paths or URLs).
ImagePrompt = tuple[str, object]
Prompts = str | ImagePrompt | Messages | Sequence[str | ImagePrompt | Messages]
GenConfig = SamplingParams | Sequence[SamplingParams] | None

# LMDeploy's old arguments of the call itself, and the sampling field each sets.
CALL_TIME_ARGS = {
    "request_output_len": "max_tokens",
    "top_k": "top_k",
    "top_p": "top_p",
    "temperature": "temperature",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
}


@dataclass
class Response:
    """One prompt's result, as LMDeploy's ``Response``.

    ``index`` is the prompt's position in the batch. From ``stream_infer``,
    ``text``, ``token_ids`` and ``logprobs`` are deltas while ``generate_token_len``
    counts every token generated so far; ``finish_reason`` ("stop" or "length")
    comes with the last delta.
    """

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0


@dataclass
class Session:
    """A conversation of ``Pipeline.chat``, as LMDeploy's: its ``(prompt, reply)`` turns, and the last reply whole."""

    history: list[tuple[str | ImagePrompt, str]] = field(default_factory=list)
    response: Response | None = None


class Pipeline:
    """Runs prompts through the chat template on an owned ``LLM`` (``pipe.llm``)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine; also runs when the pipeline is collected."""
        self.llm.shutdown()

    def __call__(
        self,
        prompts: Prompts,
        gen_config: GenConfig = None,
        adapter_name: str | None = None,
        use_tqdm: bool = False,
        do_preprocess: bool = True,
        **call_time: object,
    ) -> Response | list[Response]:
        """Reply to a prompt or a batch: one ``Response`` for a string, a ``(text, images)`` pair or a message list,
        else a list.

        A string is one user message; with ``do_preprocess=False`` it is the whole prompt, without the chat
        template. A pair is one user message of text and an image or a list of them (PIL images, as
        ``load_image`` gives, paths or URLs), for a vision-language model: the images go where the text has
        ``<IMAGE_TOKEN>``, or else before the text, as in LMDeploy. Messages may hold ``image_url`` parts,
        which stay where they are. ``gen_config`` (default ``GenerationConfig()``, greedy) may be one per
        prompt; ``adapter_name`` runs them through that LoRA adapter. LMDeploy's deprecated arguments of the call
        (``request_output_len``, ``top_k``, ``top_p``, ``temperature``, ``repetition_penalty``,
        ``ignore_eos``) override ``gen_config``, with a DeprecationWarning.
        """
        prompts, single = _prompts(prompts, do_preprocess)
        params = _params(gen_config, adapter_name, len(prompts), _call_time(call_time))
        run = self.llm.chat if do_preprocess else self.llm.generate
        responses = [_response(out, i) for i, out in enumerate(run(prompts, params, use_tqdm=use_tqdm))]
        return responses[0] if single else responses

    def stream_infer(
        self,
        prompts: Prompts,
        gen_config: GenConfig = None,
        adapter_name: str | None = None,
        do_preprocess: bool = True,
        **call_time: object,
    ) -> Iterator[Response]:
        """Yield ``Response`` deltas of every prompt as they come, all prompts running at once.

        Stopping early (closing the iterator) aborts the prompts still running.
        """
        prompts, _ = _prompts(prompts, do_preprocess)
        params = _params(gen_config, adapter_name, len(prompts), _call_time(call_time))
        stream = self.llm.stream_chat if do_preprocess else self.llm.stream_generate
        return _responses(stream(prompts, params))

    def chat(
        self,
        prompt: str | ImagePrompt,
        session: Session | None = None,
        gen_config: SamplingParams | None = None,
        stream_response: bool = False,
        adapter_name: str | None = None,
    ) -> Session | Iterator[Response]:
        """Reply to ``prompt`` (text or a ``(text, images)`` pair) after the turns of ``session`` (None: a new one)
        and return the session, with the reply in ``session.response`` and the turn added to ``session.history``.

        With ``stream_response``, return an iterator of the reply's Response deltas instead; the session
        takes the turn when it ends.
        """
        content = _content(prompt, "a chat prompt")
        session = session if session is not None else Session()
        turn = self._turn(session, prompt, content, _params(gen_config, adapter_name, 1))
        if stream_response:
            return turn
        for _ in turn:
            pass
        return session

    def _turn(
        self, session: Session, prompt: str | ImagePrompt, content: Content, params: list[SamplingParams]
    ) -> Iterator[Response]:
        past = [(_content(p, f"session.history[{i}]"), reply) for i, (p, reply) in enumerate(session.history)]
        whole = None
        with contextlib.closing(self.llm.stream_chat(conversation(content, past), params)) as d:
            for _, out in d:
                whole = accumulate(whole, out)
                yield _response(out, 0)
        session.response = _response(whole, 0)
        session.history.append((prompt, session.response.text))

    def get_ppl(self, input_ids: list[int] | Sequence[list[int]] | Mapping) -> list[float]:
        """Each prompt's cross-entropy, as LMDeploy's: the mean negative log-likelihood of its tokens after the
        first (the perplexity's logarithm), from the engine's prompt logprobs. A tokenizer's output works too.
        """
        if isinstance(input_ids, Mapping):
            input_ids = input_ids["input_ids"]
        prompts = [input_ids] if input_ids and isinstance(input_ids[0], int) else list(input_ids)
        for i, ids in enumerate(prompts):
            if not isinstance(ids, (list, tuple)) or len(ids) < 2:
                raise ValueError(f"prompt {i}: get_ppl needs a list of at least 2 token ids, got {ids!r}")
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        outs = self.llm.generate([list(ids) for ids in prompts], params, use_tqdm=False)
        return [
            -sum(step[t] for step, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:]))
            / (len(out.prompt_token_ids) - 1)
            for out in outs
        ]


def pipeline(
    model_path: str | None = None,
    backend_config: EngineConfig | None = None,
    chat_template_config: object = None,
    log_level: str = "ERROR",
    **engine_args: object,
) -> Pipeline:
    """Start an engine (``model_path=None``: the bundled model) and return a ``Pipeline`` on it.

    ``backend_config`` is an EngineConfig, or LMDeploy's TurbomindEngineConfig or PytorchEngineConfig;
    its engine arguments are overridden by ``engine_args``. ``chat_template_config`` is a built-in
    template name, a Jinja file, or an object or dict with a ``model_name`` naming one (LMDeploy's
    ``ChatTemplateConfig``).
    """
    if isinstance(backend_config, BackendConfig):
        args = backend_config.engine_args()
    elif isinstance(backend_config, EngineConfig):
        args = dataclasses.asdict(backend_config)
    elif backend_config is None:
        args = {}
    else:
        raise TypeError(
            "backend_config must be a tristream EngineConfig, a TurbomindEngineConfig or a PytorchEngineConfig, "
            f"got {type(backend_config).__name__}"
        )
    args.update(engine_args, log_level=log_level)
    model = args.pop("model", None)
    template = _template_name(chat_template_config)
    if template is not None:
        args["chat_template"] = template
    return Pipeline(LLM(model_path if model_path is not None else model, **args))


def _template_name(config: object) -> str | None:
    """The engine's ``chat_template`` argument for a ``chat_template_config``."""
    if config is None:
        return None
    if isinstance(config, str):
        name = config
    elif isinstance(config, dict):
        name = config.get("model_name")
    elif hasattr(config, "model_name"):
        name = config.model_name
    else:
        raise TypeError(
            f"chat_template_config must be a template name, a file, or have a model_name; got {type(config).__name__}"
        )
    if not isinstance(name, str) or not name:
        raise ValueError(f"chat_template_config needs a template name or file, got {name!r}")
    resolve_chat_template(name)
    return name


def _prompts(prompts: Prompts, chat_template: bool) -> tuple[list[str] | list[Messages], bool]:
    """The prompts as conversations for ``LLM.chat`` (or, with ``chat_template=False``, as text for
    ``LLM.generate``), and whether they were a single prompt."""
    if isinstance(prompts, (str, tuple)):
        return [_prompt(prompts, 0, chat_template)], True
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(
            f"prompts must be a string, a (text, images) pair, a message list, or a non-empty list of them; "
            f"got {prompts!r}"
        )
    if all(isinstance(m, dict) for m in prompts):
        return [_prompt(prompts, 0, chat_template)], True
    return [_prompt(p, i, chat_template) for i, p in enumerate(prompts)], False


def _prompt(prompt: str | ImagePrompt | Messages, i: int, chat_template: bool) -> str | Messages:
    messages = isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)
    if not (messages or isinstance(prompt, (str, tuple))):
        raise ValueError(
            f"prompt {i} must be a string, a (text, images) pair or a non-empty list of message dicts, got {prompt!r}"
        )
    if not chat_template:
        if not isinstance(prompt, str):
            raise ValueError(
                f"prompt {i}: do_preprocess=False takes text, not {'messages' if messages else '(text, images)'}"
            )
        return prompt
    return prompt if messages else [{"role": "user", "content": _content(prompt, f"prompt {i}")}]


def _content(prompt: object, name: str) -> Content:
    """The user message content of a text prompt or of LMDeploy's ``(text, image or images)``: the images where
    the text has ``<IMAGE_TOKEN>``, or else before the text. ``name`` names the prompt in a ValueError."""
    if isinstance(prompt, str):
        return prompt
    if not (isinstance(prompt, tuple) and len(prompt) == 2 and isinstance(prompt[0], str)):
        raise ValueError(f"{name} must be a string or a (text, images) pair, got {prompt!r}")
    text, images = prompt
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if IMAGE_TOKEN not in text:
        text = IMAGE_TOKEN * len(images) + text
    try:
        return image_content(text, images, IMAGE_TOKEN)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _call_time(args: dict[str, object]) -> dict[str, object]:
    """The sampling fields that LMDeploy's deprecated arguments of the call set, with its DeprecationWarning."""
    unknown = sorted(set(args) - set(CALL_TIME_ARGS))
    if unknown:
        raise TypeError(f"unexpected arguments {unknown}; the call takes gen_config=GenerationConfig(...)")
    if args:
        warnings.warn(
            f"{', '.join(args)} as arguments of the call are deprecated, as in LMDeploy: set them in "
            "gen_config=GenerationConfig(...) (request_output_len is max_new_tokens)",
            DeprecationWarning,
            stacklevel=3,
        )
    return {CALL_TIME_ARGS[name]: value for name, value in args.items()}


def _params(
    gen_config: GenConfig, adapter_name: str | None, count: int, overrides: dict[str, object] | None = None
) -> list[SamplingParams]:
    """One copy of the parameters per prompt, with ``overrides`` and ``lora=adapter_name`` when given."""
    if gen_config is None or isinstance(gen_config, SamplingParams):
        configs = [gen_config if gen_config is not None else GenerationConfig()] * count
    elif isinstance(gen_config, (list, tuple)):
        configs = list(gen_config)
        if len(configs) != count:
            raise ValueError(f"got {len(configs)} gen_configs for {count} prompts")
    else:
        raise TypeError(
            f"gen_config must be a GenerationConfig, a SamplingParams or a list of them, got {gen_config!r}"
        )
    for c in configs:
        if not isinstance(c, SamplingParams):
            raise TypeError(f"gen_config must be a GenerationConfig or SamplingParams, got {type(c).__name__}")
        if c.num_samples != 1:
            raise ValueError("a pipeline returns one Response per prompt: n and best_of must be 1")
    changes = {**(overrides or {}), **({"lora": adapter_name} if adapter_name is not None else {})}
    return [dataclasses.replace(c, **changes) if changes else c for c in configs]


def _responses(deltas: Iterator[tuple[int, RequestOutput]]) -> Iterator[Response]:
    """``deltas`` as Responses; closing this closes ``deltas``, which aborts what still runs."""
    with contextlib.closing(deltas):
        for i, out in deltas:
            yield _response(out, i)


def _response(out: RequestOutput, index: int) -> Response:
    """The one sample of ``out``, a whole result or a delta, as prompt ``index``'s Response."""
    s = out.outputs[0]
    return Response(
        s.text,
        out.metrics.num_generated_tokens,
        len(out.prompt_token_ids),
        s.finish_reason,
        s.token_ids,
        s.logprobs,
        index,
    )
