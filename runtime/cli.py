"""The ``tristream`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from tristream.config_file import is_config_file, load_config_file, parse_lora_modules
from tristream.engine import AsyncEngine
from tristream.sampling_params import SamplingParams

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
]


class _LoraModules(argparse.Action):
    """``--lora-modules NAME=PATH ...`` as a dict of adapter directories by name."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, parse_lora_modules(values))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument(
        "--chat-template", default=None, help="a Jinja file, or a built-in template name (default: the model's)"
    )
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, help="split the model over this many GPUs")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-tokens", type=int, default=None)
    g.add_argument("--kv-cache-bytes", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enforce-eager", action="store_true", help="run without CUDA graphs")
    g.add_argument(
        "--pipelined",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="plan the next step while the GPU runs this one (--no-pipelined: one step at a time)",
    )
    g.add_argument("--reasoning-parser", default=None, choices=["think"])
    g.add_argument(
        "--lora-modules",
        dest="lora_adapters",
        nargs="+",
        action=_LoraModules,
        default=None,
        metavar="NAME=PATH",
        help="PEFT LoRA adapter directories to load at start-up, by name",
    )
    g.add_argument("--max-loras", type=int, default=None, help="adapters resident at once (default: as many as given)")
    g.add_argument(
        "--max-lora-rank", type=int, default=None, help="the largest adapter rank (default: 16 or the largest given)"
    )
    g.add_argument(
        "--lora",
        default=None,
        metavar="NAME",
        help="the adapter of --lora-modules that this command's requests use (serve: those naming the model)",
    )
    g.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int | None, temperature: float = 0.7) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")


def _server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: the model's)")
    g.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 and the tokenizer routes"
    )


ENGINE_KEYS = (
    "model",
    "tokenizer",
    "chat_template",
    "dtype",
    "device",
    "load_format",
    "max_model_len",
    "tensor_parallel_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "page_size",
    "gpu_memory_utilization",
    "kv_cache_tokens",
    "kv_cache_bytes",
    "enable_prefix_caching",
    "enforce_eager",
    "pipelined",
    "reasoning_parser",
    "log_level",
    "lora_adapters",
    "max_loras",
    "max_lora_rank",
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
    "seed",
    "ignore_eos",
    "lora",
)


def _engine(args: argparse.Namespace) -> AsyncEngine:
    return AsyncEngine(**{k: getattr(args, k) for k in ENGINE_KEYS})


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**{k: getattr(args, k) for k in SAMPLING_KEYS})


async def _generate(args: argparse.Namespace) -> None:
    params = _params(args)
    async with _engine(args) as engine:
        chat = args.chat if args.chat is not None else engine.info["tokenizer"]["has_chat_template"]
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
    """Stream answers to a few chat prompts, run as one batch, then one line of throughput."""
    params = _params(args)
    async with _engine(args) as engine:
        queues = [asyncio.Queue() for _ in DEMO_PROMPTS]

        async def run(i: int) -> None:
            async for out in engine.chat([{"role": "user", "content": DEMO_PROMPTS[i]}], params):
                queues[i].put_nowait(out)

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(run(i)) for i in range(len(DEMO_PROMPTS))]
        prompt_tokens = generated = 0
        for i, prompt in enumerate(DEMO_PROMPTS):
            print(f"\n>>> {prompt}\n", flush=True)
            while True:
                out = await queues[i].get()
                print(out.outputs[0].text, end="", flush=True)
                generated += len(out.outputs[0].token_ids)
                if out.finished:
                    prompt_tokens += out.metrics.num_prompt_tokens
                    break
            print()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        print(
            f"\n{len(DEMO_PROMPTS)} requests, {prompt_tokens} prompt + {generated} generated tokens "
            f"in {elapsed:.2f} s: {generated / elapsed:.1f} output tok/s on {engine.info['gpu']['device']}"
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
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the chat template (default: when the model has one)",
    )
    _sampling_args(gen, max_tokens=256)
    _engine_args(gen)
    demo = sub.add_parser("demo", help="stream answers to a few chat prompts, then print throughput")
    _sampling_args(demo, max_tokens=128, temperature=0.0)
    _engine_args(demo)
    for name, help_text in (
        ("serve", "run the OpenAI-compatible HTTP server"),
        ("webchat", "run the server and print the address of its web chat page"),
    ):
        srv = sub.add_parser(name, help=help_text)
        srv.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a YAML file of these options")
        _server_args(srv)
        _engine_args(srv)
    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a YAML file of these options")
    chat.add_argument("--system", default=None, help="the system prompt")
    _sampling_args(chat, max_tokens=512)
    _engine_args(chat)
    batch = sub.add_parser("batch", help="run a JSONL file of requests into a JSONL file of results")
    batch.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a YAML file of these options")
    batch.add_argument(
        "--input", required=False, help="JSONL requests: {id, prompt} or {id, messages}, or OpenAI batch lines"
    )
    batch.add_argument("--output", required=False, help="JSONL results, appended to; ids already there are skipped")
    _sampling_args(batch, max_tokens=256, temperature=0.0)
    _engine_args(batch)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a YAML config file sets defaults that flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = getattr(args, "config", None)
    if config is not None:
        if not is_config_file(config):
            parser.error(f"{config}: a config file must end in .yaml or .yml")
        sub = parser._subparsers._group_actions[0].choices[args.command]
        known = {a.dest for a in sub._actions} - {"help", "config"}
        try:
            sub.set_defaults(**load_config_file(config, known))
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        args = parser.parse_args(argv)
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
