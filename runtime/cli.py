"""The ``tristream`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from tristream.engine import AsyncEngine
from tristream.sampling_params import SamplingParams

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
]


def _engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-tokens", type=int, default=None)
    g.add_argument("--kv-cache-bytes", type=int, default=None)
    g.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")


ENGINE_KEYS = (
    "model", "dtype", "device", "load_format", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "page_size", "gpu_memory_utilization", "kv_cache_tokens", "kv_cache_bytes", "log_level",
)


def _engine(args: argparse.Namespace) -> AsyncEngine:
    return AsyncEngine(**{k: getattr(args, k) for k in ENGINE_KEYS})


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.seed, ignore_eos=args.ignore_eos,
    )


async def _generate(args: argparse.Namespace) -> None:
    params = _params(args)
    async with _engine(args) as engine:
        chat = args.chat if args.chat is not None else engine.info["tokenizer"]["has_chat_template"]
        for i, prompt in enumerate(args.prompts):
            if i:
                print()
            stream = engine.chat([{"role": "user", "content": prompt}], params) if chat else engine.generate(prompt, params)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tristream", description="tristream LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream completions of prompts to stdout")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="apply the chat template (default: when the model has one)")
    _sampling_args(gen, max_tokens=256)
    _engine_args(gen)
    demo = sub.add_parser("demo", help="stream answers to a few chat prompts, then print throughput")
    _sampling_args(demo, max_tokens=128)
    _engine_args(demo)
    demo.set_defaults(temperature=0.0)
    return parser


def _run_loop(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner = {"generate": _generate, "demo": _demo}[args.command]
    try:
        _run_loop(runner(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tristream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
