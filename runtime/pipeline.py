"""An LMDeploy-style front door: ``pipeline(...)`` and ``Response``, on ``LLM``."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tristream.config import EngineConfig
from tristream.llm import LLM
from tristream.outputs import RequestOutput
from tristream.sampling_params import GenerationConfig, SamplingParams
from tristream.tokenizer_proc.templates import resolve_chat_template

Messages = list[dict]
Prompts = str | Messages | Sequence[str | Messages]
GenConfig = SamplingParams | Sequence[SamplingParams] | None


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
        self, prompts: Prompts, gen_config: GenConfig = None, adapter_name: str | None = None, use_tqdm: bool = False
    ) -> Response | list[Response]:
        """Reply to a prompt or a batch: one ``Response`` for a string or a message list, else a list.

        A string is one user message. ``gen_config`` (default ``GenerationConfig()``,
        greedy) may be one per prompt; ``adapter_name`` runs them through that LoRA adapter.
        """
        conversations, single = _conversations(prompts)
        params = _params(gen_config, adapter_name, len(conversations))
        outputs = self.llm.chat(conversations, params, use_tqdm=use_tqdm)
        responses = [_response(out, i) for i, out in enumerate(outputs)]
        return responses[0] if single else responses

    def stream_infer(
        self, prompts: Prompts, gen_config: GenConfig = None, adapter_name: str | None = None
    ) -> Iterator[Response]:
        """Yield ``Response`` deltas of every prompt as they come, all prompts running at once.

        Stopping early (closing the iterator) aborts the prompts still running.
        """
        conversations, _ = _conversations(prompts)
        return _responses(self.llm.stream_chat(conversations, _params(gen_config, adapter_name, len(conversations))))


def pipeline(
    model_path: str | None = None,
    backend_config: EngineConfig | None = None,
    chat_template_config: object = None,
    log_level: str = "ERROR",
    **engine_args: object,
) -> Pipeline:
    """Start an engine (``model_path=None``: the bundled model) and return a ``Pipeline`` on it.

    ``backend_config`` fields are engine arguments, which ``engine_args`` override.
    ``chat_template_config`` is a built-in template name, a Jinja file, or an object
    or dict with a ``model_name`` naming one (LMDeploy's ``ChatTemplateConfig``).
    """
    if backend_config is not None and not isinstance(backend_config, EngineConfig):
        raise TypeError(f"backend_config must be a tristream EngineConfig, got {type(backend_config).__name__}")
    args = dataclasses.asdict(backend_config) if backend_config is not None else {}
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


def _conversations(prompts: Prompts) -> tuple[list[Messages], bool]:
    """The prompts as message lists, and whether they were a single prompt."""
    if isinstance(prompts, str):
        return [_as_messages(prompts, 0)], True
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a string, a message list, or a non-empty list of them; got {prompts!r}")
    if all(isinstance(m, dict) for m in prompts):
        return [list(prompts)], True
    return [_as_messages(p, i) for i, p in enumerate(prompts)], False


def _as_messages(prompt: str | Messages, i: int) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise ValueError(f"prompt {i} must be a string or a non-empty list of message dicts, got {prompt!r}")


def _params(gen_config: GenConfig, adapter_name: str | None, count: int) -> list[SamplingParams]:
    """One copy of the parameters per prompt, with ``lora=adapter_name`` when given."""
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
    return [dataclasses.replace(c, lora=adapter_name) if adapter_name is not None else c for c in configs]


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
