"""The ``tristream`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import os
import sys
import time
import typing
from typing import Any

from tristream import __version__
from tristream.config import EngineConfig, engine_config
from tristream.config_file import is_config_file, load_config_file, parse_lora_modules, parse_mm_limits
from tristream.datasets import CUTOFF_LEN, PREDICTIONS
from tristream.engine import AsyncEngine
from tristream.media import DEFAULT_MAX_IMAGE_BYTES, MediaPolicy
from tristream.nodes import node_rank, run_node
from tristream.openai_api import DEFAULT_MAX_REQUEST_BYTES, RequestDefaults, with_system
from tristream.outputs import RequestOutput
from tristream.sampling_params import SamplingParams
from tristream.streams import merge
from tristream.tokenizer_proc.templates import resolve_chat_template

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


class _MediaLimits(argparse.Action):
    """``--flag image=N`` or ``--flag '{"image": N}'`` as a dict of counts by medium."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, parse_mm_limits(values))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _parsed_by(parse: Any) -> Any:
    """An argparse type that parses with ``parse``, its ValueError becoming the flag's error message."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parsed


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
    if "parse" in meta:
        return {**options, "type": _parsed_by(meta["parse"])}
    if typing.get_origin(kind) is dict and typing.get_args(kind)[1] is int:
        return {**options, "action": _MediaLimits}
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


# The sampling flags, by SamplingParams field: their type and help. A request that leaves a field out takes
# the flag's value, or else the model's generation_config.json default and then SamplingParams' (in --help).
SAMPLING_FLAGS = {
    "max_tokens": (int, "most tokens to generate"),
    "temperature": (float, "0 is greedy"),
    "top_p": (float, "nucleus sampling: keep the most likely tokens up to this probability"),
    "top_k": (int, "keep the k most likely tokens; 0 keeps all"),
    "min_p": (float, "drop tokens below this fraction of the top token's probability"),
    "repetition_penalty": (float, "over prompt and output tokens; 1 is off"),
    "presence_penalty": (float, "over output tokens, in [-2, 2]"),
    "frequency_penalty": (float, "over output tokens, in [-2, 2]"),
}
SAMPLING_DEFAULTS = {
    **{f.name: f.default for f in dataclasses.fields(SamplingParams)},
    "max_tokens": "until EOS or the context; 16 for a /v1/completions body",
}


def _sampling_args(parser: argparse.ArgumentParser, system: str, **own: object) -> None:
    """The sampling flags and the system prompt (``--system``, or ``--default-system`` for the commands that
    take requests): what the command's requests take where they leave them out. ``own`` are a command's own
    defaults, which take the place of the model's."""
    g = parser.add_argument_group(
        "sampling",
        "what a request that leaves a field out takes; without the flag, the model's generation_config.json "
        "or else the default shown",
    )
    for name, (kind, help_text) in SAMPLING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        default = own.get(name)
        help_text = _with_default(help_text, SAMPLING_DEFAULTS[name] if default is None else default)
        g.add_argument(flag, type=kind, default=default, help=help_text)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    g.add_argument("--ignore-eos", action="store_const", const=True, help="go on past the end-of-sequence token")
    flag = "--" + system.replace("_", "-")
    g.add_argument(flag, dest=system, default=None, help="the system prompt of conversations that have none")


def _server_args(parser: argparse.ArgumentParser, env: bool) -> None:
    """Where to listen; with ``env``, $API_HOST and $API_PORT (as LLaMA-Factory's api reads them) set the defaults."""
    g = parser.add_argument_group("server")
    host, port = (
        (os.environ.get("API_HOST", "127.0.0.1"), os.environ.get("API_PORT", 8000)) if env else ("127.0.0.1", 8000)
    )
    g.add_argument(
        "--host",
        default=host,
        help="the address to listen on" + env * "; $API_HOST sets it too" + " (default: 127.0.0.1)",
    )
    port_help = "the port to listen on; 0 picks a free one" + env * "; $API_PORT sets it too" + " (default: 8000)"
    g.add_argument("--port", type=int, default=port, help=port_help)
    g.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: the model's)")
    g.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 and the tokenizer routes"
    )
    g.add_argument(
        "--enable-lora-runtime-loading",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (default: off, unless "
        "$VLLM_ALLOW_RUNTIME_LORA_UPDATING is 1 or true)",
    )
    g.add_argument(
        "--lora-root",
        metavar="FOLDER",
        default=None,
        help="load adapters at run time only from folders under FOLDER, symlinks resolved "
        "(default: any folder, with a warning)",
    )
    g.add_argument("--disable-log-requests", action="store_true", help="log no line per request")
    g.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help=f"the largest image a request may send or link to, encoded (default: {DEFAULT_MAX_IMAGE_BYTES}, 20 MiB)",
    )
    g.add_argument(
        "--allowed-local-media-path",
        metavar="FOLDER",
        default=None,
        help="let requests name image files (a path or file:// URL) under FOLDER (default: none; no local files)",
    )
    g.add_argument(
        "--image-fetch-timeout", type=float, default=10.0, help="seconds to fetch an http(s) image (default: 10)"
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"the largest request body; a larger one is a 413 (default: {DEFAULT_MAX_REQUEST_BYTES}, 16 MiB)",
    )


def _batch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="JSONL requests: {id, prompt} or {id, messages}, or OpenAI batch lines")
    parser.add_argument("--output", help="JSONL results, appended to; ids already there are skipped")
    parser.add_argument("--retry-errors", action="store_true", help="run the error records of --output again")
    g = parser.add_argument_group("LLaMA-Factory batch prediction, instead of --input and --output")
    g.add_argument("--eval-dataset", metavar="NAME[,NAME...]", help="the datasets of dataset_info.json to answer")
    g.add_argument("--dataset-dir", default="data", help="the folder of dataset_info.json (default: data)")
    g.add_argument("--max-samples", type=int, default=None, help="answer the first N samples of each dataset")
    g.add_argument(
        "--cutoff-len", type=int, default=CUTOFF_LEN, help=_with_default("most prompt and label tokens", CUTOFF_LEN)
    )
    g.add_argument("--output-dir", help=f"where {PREDICTIONS} goes; the lines already there are skipped")


def _engine(args: argparse.Namespace) -> AsyncEngine:
    return AsyncEngine(**engine_args(args))


def _defaults(args: argparse.Namespace) -> RequestDefaults:
    """The sampling options and the system prompt that the flags give, for requests that leave them out."""
    names = [*SAMPLING_FLAGS, "stop", "ignore_eos", "lora"]
    sampling = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return RequestDefaults(sampling, getattr(args, "system", getattr(args, "default_system", None)))


def _params(engine: AsyncEngine, defaults: RequestDefaults) -> SamplingParams:
    """The flags' sampling options over the model's defaults (once the engine has started)."""
    return dataclasses.replace(engine.default_sampling_params(), **defaults.sampling)


async def _generate(args: argparse.Namespace) -> None:
    defaults = _defaults(args)
    async with _engine(args) as engine:
        params = _params(engine, defaults)
        chat = args.chat if args.chat is not None else engine.has_chat_template
        for i, prompt in enumerate(args.prompts):
            if i:
                print()
            messages = with_system([{"role": "user", "content": prompt}], defaults.system)
            stream = engine.chat(messages, params) if chat else engine.generate(prompt, params)
            async for out in stream:
                print(out.outputs[0].text, end="", flush=True)
            print()


async def _demo(args: argparse.Namespace) -> None:
    """Stream answers to a few chat prompts, run as one batch, then one line of throughput.

    Every answer runs at once; they are shown in order, each as its deltas come (the later ones
    from what they had gathered by then)."""
    defaults = _defaults(args)
    async with _engine(args) as engine:
        params = _params(engine, defaults)
        chats = [with_system([{"role": "user", "content": prompt}], defaults.system) for prompt in DEMO_PROMPTS]
        streams = [engine.chat(messages, params) for messages in chats]
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

    config = engine_config(**engine_args(args))
    if node_rank(config):  # a host that runs only its share of the ranks
        if run_node(config):
            raise RuntimeError("this host's ranks stopped before the engine did")
        return
    await serve(
        _engine(args),
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        announce=args.command == "webchat",
        default_lora=args.lora,
        defaults=_defaults(args),
        log_requests=not args.disable_log_requests,
        media=_media(args),
        enable_lora_runtime_loading=_runtime_lora(args),
        lora_root=args.lora_root,
        max_request_bytes=args.max_request_bytes,
    )


def _runtime_lora(args: argparse.Namespace) -> bool:
    """Whether clients may load adapters at run time: the flag, or vLLM's $VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    env = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower()
    return args.enable_lora_runtime_loading or env in ("1", "true")


def _media(args: argparse.Namespace) -> MediaPolicy:
    """Where the server's requests may take images from, and how large and slow to fetch they may be."""
    folder = args.allowed_local_media_path
    if folder and not os.path.isdir(folder):
        raise ValueError(f"--allowed-local-media-path {folder}: no such folder")
    return MediaPolicy(folder or "", args.max_image_bytes, args.image_fetch_timeout)


async def _chat(args: argparse.Namespace) -> None:
    from tristream.terminal_chat import run_chat

    defaults = _defaults(args)
    async with _engine(args) as engine:
        await run_chat(engine, _params(engine, defaults), system=defaults.system)


async def _batch(args: argparse.Namespace) -> None:
    from tristream.batch import check_paths, run_batch
    from tristream.datasets import read_samples, run_predict

    defaults = _defaults(args)
    if args.eval_dataset is not None:
        samples = read_samples(args.eval_dataset, args.dataset_dir, args.max_samples)
        async with _engine(args) as engine:
            await run_predict(engine, defaults, samples, args.output_dir, args.cutoff_len)
        return
    check_paths(args.input, args.output)
    async with _engine(args) as engine:
        await run_batch(engine, defaults, args.input, args.output, engine.lora_adapters, args.retry_errors)


COMMANDS = {"generate": _generate, "demo": _demo, "serve": _serve, "webchat": _serve, "chat": _chat, "batch": _batch}
# ``tristream bench NAME ARGS``: the module whose ``main(argv, prog)`` runs with ARGS, and its help line.
BENCHMARKS = {
    "latency": ("tristream.bench.latency", "batches of random prompts through the engine: TTFT, TPOT and tok/s"),
    "throughput": ("tristream.bench.throughput", "offline tok/s through LLM, GPU idle time, pipelined vs synchronous"),
    "speculative": (
        "tristream.bench.speculative",
        "speculative decoding: the cost of checking k drafts, and the batch-1 speed-up against acceptance",
    ),
    "data-parallel": (
        "tristream.bench.data_parallel",
        "data-parallel replicas against one engine, and cache-aware routing against round-robin",
    ),
    "serve": (
        "tristream.bench.serving",
        "streaming requests to a server under Poisson arrivals: TTFT, TPOT, ITL, E2E and goodput",
    ),
}


def _bench_args(parser: argparse.ArgumentParser) -> None:
    """A subcommand per benchmark; its arguments, ``--help`` included, go to the benchmark's own parser."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (_, help_text) in BENCHMARKS.items():
        sub.add_parser(name, help=help_text, add_help=False)


def _bench(args: argparse.Namespace) -> None:
    """Run the benchmark that ``args`` name with the rest of the command line."""
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    module.main(args.bench_argv, prog=f"tristream bench {args.benchmark}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tristream", description="tristream LLM inference engine")
    parser.add_argument("--version", action="version", version=f"tristream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream completions of prompts to stdout")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="apply the chat template (default: when the model has one)",
    )  # fmt: skip
    sub.add_parser("demo", help="stream answers to a few chat prompts, then print throughput")
    _server_args(sub.add_parser("serve", help="run the OpenAI-compatible HTTP server"), env=True)
    _server_args(sub.add_parser("webchat", help="run the server and print the address of its web chat page"), False)
    sub.add_parser("chat", help="chat with a model in the terminal")
    _batch_args(sub.add_parser("batch", help="run a JSONL file of requests, or LLaMA-Factory datasets, into results"))
    for name, command in sub.choices.items():
        if name in TAKES_MODEL:
            command.add_argument("target", nargs="?", metavar="MODEL|CONFIG.yaml", help=TARGET_HELP)
        _sampling_args(command, "default_system" if name in TAKE_REQUESTS else "system", **OWN_DEFAULTS.get(name, {}))
        add_engine_args(command)
        command.add_argument("--lora", default=None, metavar="NAME", help=LORA_HELP)
    bench = sub.add_parser("bench", help="benchmark latency, throughput or a server (`tristream bench NAME --help`)")
    _bench_args(bench)
    return parser


# The demo shows the engine on fixed prompts: short greedy answers, whatever the model's sampling defaults.
OWN_DEFAULTS = {"demo": {"temperature": 0.0, "max_tokens": 128}}
# Commands whose first argument is a model (as in ``vllm serve MODEL``) or a YAML file of their options.
TAKES_MODEL = ("serve", "webchat", "chat", "batch")
# Commands that run requests given to them, whose system prompt is a default: ``--default-system``.
TAKE_REQUESTS = ("serve", "webchat", "batch")
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
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_argv = rest
        return args
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args = _apply_target(parser, args, argv)
    if args.command == "batch" and not (args.input and args.output or args.eval_dataset and args.output_dir):
        parser.error("batch needs --input and --output, or --eval-dataset and --output-dir (as flags or in a YAML)")
    if args.chat_template is not None:
        try:
            resolve_chat_template(args.chat_template)
        except ValueError as e:
            parser.error(str(e))
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
        if args.command == "bench":
            _bench(args)
        else:
            _run_loop(COMMANDS[args.command](args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tristream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
