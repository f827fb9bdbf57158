"""Prefix caching on vs off: cache hit rate, prefill tokens computed and time to first token.

Two workloads on the bundled model (CPU, fp32, greedy), each run with a fresh engine
with ``enable_prefix_caching=True`` and then ``False``:

- shared system prompt: a ~1000-token system prompt followed by a different short
  question per request, all submitted at once as token ids; 8 new tokens, EOS ignored.
- multi-turn chat: conversations through ``engine.chat``, each turn sending the whole
  history (earlier replies included) plus a new user message; 32 new tokens per turn.
  The conversations run concurrently, their turns one after another.

The hit rate comes from the scheduler's counters (``get_stats()`` before and after the
workload) and from each request's ``num_cached_tokens``. The KV cache is sized so the
whole workload fits with the cache off, so the runs differ in compute, not in queueing
for memory. Each engine serves one short unrelated warm-up request first (not counted).

    python bench/prefix_cache.py --questions 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import time
from collections.abc import AsyncIterator

from transformers import AutoTokenizer

from tristream import AsyncEngine, RequestOutput, SamplingParams
from tristream.bench.report import RESULTS, header, model_summary, now
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model

HANDBOOK = (
    "You are the customer support assistant of Larkspur Books, an independent bookshop with three stores "
    "and an online shop. Answer every question politely, briefly and truthfully, using only the policies "
    "below. If the policies do not cover a question, say so and offer to pass the question on to a member "
    "of staff. Never invent prices, dates or order numbers, and never promise anything the policies do not "
    "allow. Address the customer by name when they give it, and end every answer by asking whether there "
    "is anything else you can help with.\n\n"
    "Larkspur Books was founded in 1987 in a former bakery on Mill Street. The shop sells new and used "
    "books, audiobooks, maps, stationery and gift cards, and it runs a reading club, a children's story "
    "hour and a small cafe. The stores open from nine in the morning to seven in the evening on weekdays, "
    "from ten to six on Saturdays, and from eleven to four on Sundays. The online shop takes orders at any "
    "time, and the support team answers messages within one working day.\n\n"
    "The policies follow, one numbered rule at a time.\n"
)
TOPICS = [
    "returns of new books",
    "returns of used books",
    "damaged deliveries",
    "late deliveries",
    "gift cards",
    "reservations",
    "the reading club",
    "signed editions",
    "special orders",
    "student discounts",
    "loyalty points",
    "the cafe",
    "lost property",
    "events and readings",
    "audiobooks",
    "large print editions",
]
RULES = [
    "customers may bring the item to any store within thirty days with the receipt",
    "the support team checks the order history before promising anything",
    "a member of staff must approve any exception in writing",
    "the customer receives a confirmation email within one working day",
    "refunds go back to the original payment method, never in cash",
    "the assistant explains the rule first and then the next step",
    "store credit is offered when the receipt is missing",
    "the assistant asks for the order number before anything else",
]


def system_prompt(tokenizer, target_tokens: int) -> str:
    """The handbook plus numbered rules, as many as fit in ``target_tokens`` tokens."""
    text, i = HANDBOOK, 0
    while True:
        topic, rule = TOPICS[i % len(TOPICS)], RULES[(i * 3 + i // len(TOPICS)) % len(RULES)]
        line = f"Rule {i + 1}. About {topic}: {rule}.\n"
        if len(tokenizer(text + line)["input_ids"]) > target_tokens:
            return text
        text, i = text + line, i + 1


QUESTION_FORMS = [
    "Can I return {x} that I bought last week?",
    "How long does delivery take for {x}?",
    "Is there a student discount on {x}?",
    "What should I do if {x} arrives damaged?",
    "Can I pay for {x} with a gift card?",
    "Can I reserve {x} in the Mill Street store?",
    "Who should I contact about {x} I ordered?",
    "Do you have {x} in large print?",
]
ITEMS = [
    "a used paperback",
    "a signed first edition",
    "a children's picture book",
    "an audiobook",
    "a box set of novels",
    "a cookbook",
    "a travel guide",
    "a comic book",
]


def questions(n: int) -> list[str]:
    """``n`` distinct short questions (64 at most)."""
    out = [form.format(x=item) for item in ITEMS for form in QUESTION_FORMS]
    return [out[(i * 9) % len(out)] for i in range(n)]


CHAT_OPENERS = [
    "I am planning a trip to Japan in the spring. What should I pack?",
    "Can you explain how the gears on a bicycle work?",
    "What is a good way to start learning to cook at home?",
    "How do I keep a small vegetable garden healthy?",
]
FOLLOW_UPS = [
    "Can you give me one concrete example?",
    "Why is that important?",
    "What is a common mistake people make with this?",
    "Summarize your advice in two sentences.",
]


# ---------------------------------------------------------------- measuring


async def collect(stream: AsyncIterator[RequestOutput]) -> dict:
    """Drain one request's stream: its tokens, text, prompt, cached tokens and TTFT."""
    tokens, text, last = [], [], None
    cached = 0
    async for out in stream:
        tokens.extend(out.outputs[0].token_ids)
        text.append(out.outputs[0].text)
        cached = max(cached, out.num_cached_tokens)
        last = out
    m = last.metrics
    return {
        "tokens": tokens,
        "text": "".join(text),
        "prompt_tokens": len(last.prompt_token_ids),
        "cached_tokens": cached,
        "ttft_s": m.first_token_time - m.arrival_time,
    }


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(requests: list[dict], before, after, wall_s: float) -> dict:
    """The figures of one run from its requests and the scheduler counters around it."""
    prompt = after.num_prompt_tokens - before.num_prompt_tokens
    hit = after.num_cache_hit_tokens - before.num_cache_hit_tokens
    ttft = [r["ttft_s"] for r in requests]
    return {
        "num_requests": len(requests),
        "prompt_tokens": prompt,
        "cache_hit_tokens": hit,
        "hit_rate": hit / prompt,
        "mean_request_hit_rate": statistics.fmean(r["cached_tokens"] / r["prompt_tokens"] for r in requests),
        "prefill_tokens": prompt - hit,
        "request_prompt_tokens": sum(r["prompt_tokens"] for r in requests),
        "request_cached_tokens": sum(r["cached_tokens"] for r in requests),
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p90_s": percentile(ttft, 0.9),
        "wall_s": wall_s,
        "cached_pages_after": after.num_cached_pages,
        "per_request": {
            "prompt_tokens": [r["prompt_tokens"] for r in requests],
            "cached_tokens": [r["cached_tokens"] for r in requests],
            "ttft_s": ttft,
        },
    }


async def warm_up(engine: AsyncEngine) -> None:
    prompt = "Warm-up: the quick brown fox jumps over the lazy dog, again and again, until the race is over."
    await collect(engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)))


async def run_shared(prompts: list[list[int]], engine_args: dict, max_tokens: int) -> tuple[dict, list[list[int]]]:
    """All prompts at once on a fresh engine; the figures and each request's tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async with AsyncEngine(None, **engine_args) as engine:
        await warm_up(engine)
        before = await engine.get_stats()
        start = time.perf_counter()
        requests = await asyncio.gather(*(collect(engine.generate(p, params)) for p in prompts))
        wall = time.perf_counter() - start
        after = await engine.get_stats()
    return summarize(requests, before, after, wall), [r["tokens"] for r in requests]


async def conversation(engine: AsyncEngine, opener: str, turns: int, params: SamplingParams) -> list[dict]:
    """One chat, each turn resending the history with the previous reply and a new question."""
    messages = [{"role": "user", "content": opener}]
    out = []
    for turn in range(turns):
        reply = await collect(engine.chat(messages, params))
        out.append(reply)
        messages.append({"role": "assistant", "content": reply["text"]})
        messages.append({"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]})
    return out


async def run_chat(engine_args: dict, conversations: int, turns: int, max_tokens: int) -> tuple[dict, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    async with AsyncEngine(None, **engine_args) as engine:
        await warm_up(engine)
        before = await engine.get_stats()
        start = time.perf_counter()
        chats = await asyncio.gather(
            *(conversation(engine, CHAT_OPENERS[i % len(CHAT_OPENERS)], turns, params) for i in range(conversations))
        )
        wall = time.perf_counter() - start
        after = await engine.get_stats()
    requests = [turn for chat in chats for turn in chat]
    figures = summarize(requests, before, after, wall)
    figures["per_turn_hit_rate"] = [
        sum(chat[t]["cached_tokens"] for chat in chats) / sum(chat[t]["prompt_tokens"] for chat in chats)
        for t in range(turns)
    ]
    figures["per_turn_ttft_mean_s"] = [statistics.fmean(chat[t]["ttft_s"] for chat in chats) for t in range(turns)]
    return figures, [r["tokens"] for r in requests]


def compare(on: dict, off: dict, tokens_on: list[list[int]], tokens_off: list[list[int]]) -> dict:
    """On/off ratios, and whether the greedy outputs agree request by request."""
    differing = sum(a != b for a, b in zip(tokens_on, tokens_off, strict=True))
    return {
        "ttft_mean_speedup": off["ttft_mean_s"] / on["ttft_mean_s"],
        "ttft_p50_speedup": off["ttft_p50_s"] / on["ttft_p50_s"],
        "ttft_p90_speedup": off["ttft_p90_s"] / on["ttft_p90_s"],
        "wall_speedup": off["wall_s"] / on["wall_s"],
        "prefill_tokens_saved": off["prefill_tokens"] - on["prefill_tokens"],
        "prefill_fraction_saved": 1 - on["prefill_tokens"] / off["prefill_tokens"],
        "outputs_identical": differing == 0,
        "requests_differing": differing,
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=64, help="requests sharing the system prompt (1-64)")
    parser.add_argument("--system-tokens", type=int, default=1000, help="size of the shared system prompt")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "prefix_cache.json"))
    args = parser.parse_args()
    if not 1 <= args.questions <= len(QUESTION_FORMS) * len(ITEMS):
        parser.error(f"--questions must be in 1..{len(QUESTION_FORMS) * len(ITEMS)}")
    if not 1 <= args.conversations <= len(CHAT_OPENERS) or args.turns < 1:
        parser.error(f"--conversations must be in 1..{len(CHAT_OPENERS)} and --turns at least 1")

    started = now()
    model_dir = resolve_model(None)
    mc = ModelConfig.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    system = system_prompt(tokenizer, args.system_tokens)
    system_ids = tokenizer(system)["input_ids"]
    asked = questions(args.questions)
    prompts = [tokenizer(f"{system}\nQuestion: {q}\nAnswer:")["input_ids"] for q in asked]
    shared = next((i for i, col in enumerate(zip(*prompts)) if len(set(col)) > 1), min(map(len, prompts)))
    assert prompts[0][: len(system_ids)] == system_ids, "the system prompt tokenizes differently inside a prompt"

    shared_new, chat_new, max_len = 8, 32, 2048
    base_args = dict(device="cpu", dtype="float32", max_model_len=max_len, log_level="WARNING")
    shared_args = base_args | dict(
        max_num_seqs=args.questions, kv_cache_tokens=args.questions * (max(map(len, prompts)) + shared_new + 16) + 256
    )
    chat_args = base_args | dict(max_num_seqs=args.conversations, kv_cache_tokens=args.conversations * max_len + 256)

    results = {}
    runs = {
        "shared_system_prompt": lambda caching: run_shared(
            prompts, shared_args | dict(enable_prefix_caching=caching), shared_new
        ),
        "multi_turn_chat": lambda caching: run_chat(
            chat_args | dict(enable_prefix_caching=caching), args.conversations, args.turns, chat_new
        ),
    }
    for name, run in runs.items():
        figures, tokens = {}, {}
        for caching in (True, False):
            label = "on" if caching else "off"
            print(f"{name}: prefix cache {label} ...", flush=True)
            figures[label], tokens[label] = asyncio.run(run(caching))
        results[name] = figures | {"on_vs_off": compare(figures["on"], figures["off"], tokens["on"], tokens["off"])}

    report = {
        **header("prefix_cache", started),
        "model": {
            "name": pathlib.Path(model_dir).name,
            "source": "bundled default model (model=None), dequantized to fp32",
            **model_summary(mc, "float32"),
        },
        "settings": {
            "shared_system_prompt": {
                "questions": args.questions,
                "system_prompt_tokens": len(system_ids),
                "shared_prefix_tokens": shared,
                "prompt_tokens_min": min(map(len, prompts)),
                "prompt_tokens_max": max(map(len, prompts)),
                "max_tokens": shared_new,
                "ignore_eos": True,
                "submitted": "all at once, as token ids",
                "engine_args": shared_args,
            },
            "multi_turn_chat": {
                "conversations": args.conversations,
                "turns": args.turns,
                "max_tokens": chat_new,
                "ignore_eos": False,
                "submitted": "conversations concurrently, turns in order, through engine.chat",
                "engine_args": chat_args,
            },
            "greedy": True,
            "hit_rate": "cache_hit_tokens / prompt_tokens, from get_stats() before and after the run",
            "mean_request_hit_rate": "mean over requests of num_cached_tokens / len(prompt_token_ids)",
            "prefill_tokens": "prompt_tokens - cache_hit_tokens",
            "ttft": "first_token_time - arrival_time, per request",
            "speedups": "off / on",
        },
        "results": results,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    columns = (
        f"{'workload':<20} | {'cache':<5} | {'hit rate':>8} | {'req hit':>7} | {'prefill tok':>11} | "
        f"{'TTFT mean':>9} | {'p50':>7} | {'p90':>7} | {'wall s':>7}"
    )
    print(columns)
    print("-" * len(columns))
    for name, r in results.items():
        for label in ("on", "off"):
            x = r[label]
            print(
                f"{name:<20} | {label:<5} | {x['hit_rate']:>8.1%} | {x['mean_request_hit_rate']:>7.1%} | "
                f"{x['prefill_tokens']:>11} | {x['ttft_mean_s']:>9.3f} | {x['ttft_p50_s']:>7.3f} | "
                f"{x['ttft_p90_s']:>7.3f} | {x['wall_s']:>7.2f}"
            )
        c = r["on_vs_off"]
        print(
            f"{name:<20} | off/on: TTFT x{c['ttft_mean_speedup']:.2f} mean, x{c['ttft_p50_speedup']:.2f} p50, "
            f"x{c['ttft_p90_speedup']:.2f} p90; wall x{c['wall_speedup']:.2f}; prefill saved "
            f"{c['prefill_tokens_saved']} tokens ({c['prefill_fraction_saved']:.1%}); greedy outputs identical: "
            f"{c['outputs_identical']} ({c['requests_differing']} differ)"
        )
    s = report["settings"]["shared_system_prompt"]
    print(
        f"\nsystem prompt {s['system_prompt_tokens']} tokens, {s['questions']} questions; "
        f"{args.conversations} chats x {args.turns} turns"
    )
    print(
        f"CPU: {report['device']['cpu_model']} ({report['device']['cpu_count']} cores), torch threads {report['torch_threads']}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
