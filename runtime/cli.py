"""The ``tristream`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
import typing
from typing import Any

from tristream.config import EngineConfig
from tristream.config_file import is_config_file, load_config_file, parse_lora_modules
from tristream.engine import AsyncEngine
from tristream.outputs import RequestOutput
from tristream.sampling_params import SamplingParams
from tristream.streams import merge

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
]


class _Mapping(argparse.Action):
    """``--flag NAME=PATH ...`` as a dict of paths by name."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, parse_lora_modules(values))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _with_default(help_text: str, default: Any) -> str:
    """``help_text`` ending in the default, unless it says one or there is none."""
    if default is None or default is False or "default" in help_text:
        return help_text
    return f"{help_text} (default: {default})"


def _flag_options(kind: Any, meta: Any, default: Any) -> dict:
    """The argparse options of an EngineConfig field of type ``kind``, with the help and metadata of ``arg``."""
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
    options = {"help": _with_default(meta["help"], default)}
    if kind is bool:
        return {**options, "action": argparse.BooleanOptionalAction}
    options.update(metavar=meta.get("metavar"), choices=meta.get("choices"))
    if typing.get_origin(kind) is dict:
        return {**options, "nargs": "+", "action": _Mapping}
    return {**options, "type": kind}


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), **defaults: Any) -> None:
    """A flag for every EngineConfig field but those in ``skip`` (``max_num_seqs`` is ``--max-num-seqs``), with
    its help and default; ``defaults`` replace some of the defaults."""
    g = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for f in (f for f in dataclasses.fields(EngineConfig) if f.name not in skip):
        meta, default = f.metadata, defaults.get(f.name, f.default)
        flags = [meta.get("flag", "--" + f.name.replace("_", "-")), *meta.get("aliases", ())]
        g.add_argument(*flags, dest=f.name, default=default, **_flag_options(hints[f.name], meta, default))


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields that the parsed flags have."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int | None, temperature: float = 0.7) -> None:
    g = parser.add_argument_group("sampling")
    for flag, kind, default, help_text in (
        ("--max-tokens", int, max_tokens, "most tokens to generate"),
        ("--temperature", float, temperature, "0 is greedy"),
        ("--top-p", float, 1.0, "nucleus sampling: keep the most likely tokens up to this probability"),
        ("--top-k", int, 0, "keep the k most likely tokens; 0 keeps all"),
        ("--min-p", float, 0.0, "drop tokens below this fraction of the top token's probability"),
        ("--repetition-penalty", float, 1.0, "over prompt and output tokens; 1 is off"),
        ("--presence-penalty", float, 0.0, "over output tokens, in [-2, 2]"),
        ("--frequency-penalty", float, 0.0, "over output tokens, in [-2, 2]"),
    ):
        g.add_argument(flag, type=kind, default=default, help=_with_default(help_text, default))
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    g.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")


def _server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="the port to listen on; 0 picks a free one (default: 8000)")
    g.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: the model's)")
    g.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 and the tokenizer routes"
    )


SAMPLING_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "ignore_eos",
    "lora",
)


def _engine(args: argparse.Namespace) -> AsyncEngine:
    return AsyncEngine(**engine_args(args))


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**{k: getattr(args, k) for k in SAMPLING_KEYS})


async def _generate(args: argparse.Namespace) -> None:
    params = _params(args)
    async with _engine(args) as engine:
        chat = args.chat if args.chat is not None else engine.has_chat_template
        for i, prompt in enumerate(args.prompts):
            if i:
                print()
            stream = (
                engine.chat([{"role": "user", "content": prompt}], params) if chat else engine.generate(prompt, params)
            )
            async for out in stream:
                print(out.outputs[0].text, end="", flush=True)
            print()


async def _demo(args: argparse.Namespace) -> None:
    """Stream answers to a few chat prompts, run as one batch, then one line of throughput.

    Every answer runs at once; they are shown in order, each as its deltas come (the later ones
    from what they had gathered by then)."""
    params = _params(args)
    async with _engine(args) as engine:
        streams = [engine.chat([{"role": "user", "content": prompt}], params) for prompt in DEMO_PROMPTS]
        held: list[list[RequestOutput]] = [[] for _ in DEMO_PROMPTS]
        shown, prompt_tokens, generated = 0, 0, 0
        start = time.perf_counter()
        print(f"\n>>> {DEMO_PROMPTS[0]}\n", flush=True)
        async with contextlib.aclosing(merge(streams)) as merged:
            async for i, out in merged:
                held[i].append(out)
                while shown < len(DEMO_PROMPTS) and held[shown]:
                    out = held[shown].pop(0)
                    print(out.outputs[0].text, end="", flush=True)
                    generated += len(out.outputs[0].token_ids)
                    if out.finished:
                        prompt_tokens += out.metrics.num_prompt_tokens
                        shown += 1
                        print(f"\n\n>>> {DEMO_PROMPTS[shown]}\n" if shown < len(DEMO_PROMPTS) else "", flush=True)
        elapsed = time.perf_counter() - start
        print(
            f"\n{len(DEMO_PROMPTS)} requests, {prompt_tokens} prompt + {generated} generated tokens "
            f"in {elapsed:.2f} s: {generated / elapsed:.1f} output tok/s on {engine.device}"
        )


async def _serve(args: argparse.Namespace) -> None:
    from tristream.server import serve

    await serve(
        _engine(args),
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        announce=args.command == "webchat",
        default_lora=args.lora,
    )


async def _chat(args: argparse.Namespace) -> None:
    from tristream.terminal_chat import run_chat

    async with _engine(args) as engine:
        await run_chat(engine, _params(args), system=args.system)


async def _batch(args: argparse.Namespace) -> None:
    from tristream.batch import check_paths, run_batch

    check_paths(args.input, args.output)
    async with _engine(args) as engine:
        await run_batch(engine, _params(args), args.input, args.output, engine.lora_adapters)


COMMANDS = {"generate": _generate, "demo": _demo, "serve": _serve, "webchat": _serve, "chat": _chat, "batch": _batch}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tristream", description="tristream LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream completions of prompts to stdout")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="apply the chat template (default: when the model has one)",
    )  # fmt: skip
    _sampling_args(gen, max_tokens=256)
    demo = sub.add_parser("demo", help="stream answers to a few chat prompts, then print throughput")
    _sampling_args(demo, max_tokens=128, temperature=0.0)
    for name, help_text in (
        ("serve", "run the OpenAI-compatible HTTP server"),
        ("webchat", "run the server and print the address of its web chat page"),
    ):
        _server_args(sub.add_parser(name, help=help_text))
    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("--system", default=None, help="the system prompt")
    _sampling_args(chat, max_tokens=512)
    batch = sub.add_parser("batch", help="run a JSONL file of requests into a JSONL file of results")
    batch.add_argument("--input", help="JSONL requests: {id, prompt} or {id, messages}, or OpenAI batch lines")
    batch.add_argument("--output", help="JSONL results, appended to; ids already there are skipped")
    _sampling_args(batch, max_tokens=256, temperature=0.0)
    for name, command in sub.choices.items():
        if name in TAKES_MODEL:
            command.add_argument("target", nargs="?", metavar="MODEL|CONFIG.yaml", help=TARGET_HELP)
        add_engine_args(command)
        command.add_argument("--lora", default=None, metavar="NAME", help=LORA_HELP)
    return parser


# Commands whose first argument is a model (as in ``vllm serve MODEL``) or a YAML file of their options.
TAKES_MODEL = ("serve", "webchat", "chat", "batch")
LORA_HELP = "the adapter of --lora-modules that this command's requests use (serve: those naming the model)"
TARGET_HELP = "the model (like --model), or a YAML file of these options that flags override"


def _apply_target(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None):
    """``args`` with the first argument applied: a model, or a config file whose options flags override."""
    target = getattr(args, "target", None)
    if target is None:
        return args
    if not is_config_file(target):
        if args.model is not None and args.model != target:
            parser.error(f"the model is given twice: {target} and --model {args.model}")
        args.model = target
        return args
    if not target.endswith((".yaml", ".yml")):
        parser.error(f"{target}: a config file must end in .yaml or .yml")
    sub = parser._subparsers._group_actions[0].choices[args.command]
    known = {a.dest for a in sub._actions} - {"help", "target"}
    try:
        sub.set_defaults(**load_config_file(target, known))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return parser.parse_args(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a YAML config file sets defaults that flags override."""
    parser = build_parser()
    args = _apply_target(parser, parser.parse_args(argv), argv)
    if args.command == "batch" and (not args.input or not args.output):
        parser.error("batch needs --input and --output (as flags or in the config file)")
    if args.lora is not None and args.lora not in (args.lora_adapters or {}):
        parser.error(
            f"--lora {args.lora}: no adapter of that name in --lora-modules "
            f"({', '.join(args.lora_adapters or {}) or 'none given'})"
        )
    return args


def _run_loop(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _run_loop(COMMANDS[args.command](args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tristream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
