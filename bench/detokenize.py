"""Detokenization cost of one engine step in the tokenizer process, on the bundled tokenizer.

A step gives each of ``--batch`` requests one new token (``--steps`` steps over realistic
text, every request at its own offset), turned into text deltas either by pushing each
request alone (``IncrementalDetokenizer.push``) or by one ``push_step`` for the whole
step. ``--baseline REV`` adds the per-request pushes of the detokenizer at git revision
REV. Figures are the median over ``--repeats`` runs of the mean time per step.

    python bench/detokenize.py --batch 256 --steps 64 --baseline 8665978
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from typing import Any

from transformers import AutoTokenizer

from tristream.bench.report import RESULTS, header, now
from tristream.model_files import resolve_model
from tristream.tokenizer_proc.detokenizer import IncrementalDetokenizer, push_step

REPO = pathlib.Path(__file__).resolve().parent.parent

TEXT = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined "
    "movable metal type with an oil-based ink and a screw press. Within fifty years, presses were running in "
    "more than two hundred cities, and the price of a book fell so far that a clerk could own a small library.\n\n"
    "To make a good cup of tea you need fresh water, a warm pot and patience: bring the water to a boil, warm "
    "the pot, add one spoon of leaves per cup and wait four minutes. 🍵 Milk goes in last, whatever anyone says.\n\n"
    "def binary_search(keys: list[int], target: int) -> int:\n    lo, hi = 0, len(keys)\n    while lo < hi:\n"
    "        mid = (lo + hi) // 2\n        if keys[mid] < target:\n            lo = mid + 1\n        else:\n"
    "            hi = mid\n    return lo\n\n"
    "Übersetzung: 你好，世界！今天天气很好。 Café, naïve, façade — 👍🏽 done.\n"
)


def detokenizer_at(rev: str) -> type:
    """``IncrementalDetokenizer`` as tokenizer_proc/detokenizer.py has it at git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:tokenizer_proc/detokenizer.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"detokenizer_at_{rev}")
    exec(compile(source, f"{rev}:tokenizer_proc/detokenizer.py", "exec"), module.__dict__)
    return module.IncrementalDetokenizer


def push_each(detoks: list[Any], chunks: list[list[int]]) -> list[str]:
    """One step as separate pushes."""
    return [d.push(ids) for d, ids in zip(detoks, chunks)]


def time_per_step(
    detokenizer: type,
    tokenizer: Any,
    prompt: list[int],
    streams: list[list[int]],
    step: Callable[[list[Any], list[list[int]]], list[str]],
) -> tuple[float, list[list[str]]]:
    """Mean seconds per step of `step` over fresh detokenizers, one token per request per step, and the deltas."""
    detoks = [detokenizer(tokenizer, prompt) for _ in streams]
    steps = len(streams[0])
    start = time.perf_counter()
    deltas = [step(detoks, [ids[k : k + 1] for ids in streams]) for k in range(steps)]
    return (time.perf_counter() - start) / steps, deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--baseline", default=None, help="also time per-request pushes of the detokenizer at this revision"
    )
    parser.add_argument("--out", default=str(RESULTS / "detokenize.json"))
    args = parser.parse_args()
    started, load_before = now(), os.getloadavg()

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me something."}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    corpus = tokenizer.encode(TEXT)
    corpus = corpus * (1 + (args.steps + 13 * args.batch) // len(corpus))
    streams = [corpus[13 * i : 13 * i + args.steps] for i in range(args.batch)]

    ways = {"per_request_push": (IncrementalDetokenizer, push_each), "push_step": (IncrementalDetokenizer, push_step)}
    if args.baseline:
        ways[f"per_request_push_at_{args.baseline}"] = (detokenizer_at(args.baseline), push_each)
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        deltas = []
        for name, (detokenizer, step) in ways.items():
            seconds, step_deltas = time_per_step(detokenizer, tokenizer, prompt, streams, step)
            runs[name].append(seconds)
            deltas.append(step_deltas)
        assert all(d == deltas[0] for d in deltas), "every way must give the same deltas"
    per_step = {name: statistics.median(times) for name, times in runs.items()}

    report = {
        **header("detokenize", started),
        "tokenizer": "SmolLM2-135M-Instruct (bundled), byte-level BPE",
        "settings": {
            "batch": args.batch,
            "steps": args.steps,
            "repeats": args.repeats,
            "tokens_per_request_per_step": 1,
            "baseline": args.baseline,
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "step_s": per_step,
        "runs_step_s": runs,
        "speedup_push_step_vs_per_request_push": per_step["per_request_push"] / per_step["push_step"],
    }
    for name, seconds in per_step.items():
        print(f"{name:32s} {seconds * 1e3:8.3f} ms/step")
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
