"""LLaMA-Factory's batch prediction: the samples of the datasets that ``dataset_info.json`` names, in the alpaca
or the sharegpt format, answered into ``generated_predictions.jsonl`` (``prompt``, ``predict``, ``label``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import AsyncIterator

from tristream.batch import BatchSummary, complete_lines, run_jobs
from tristream.engine import AsyncEngine
from tristream.openai_api import RequestDefaults, with_system
from tristream.outputs import fold
from tristream.sampling_params import SamplingParams
from tristream.streams import merge

PREDICTIONS = "generated_predictions.jsonl"
# LLaMA-Factory's default cutoff_len: the most tokens of prompt and label together.
CUTOFF_LEN = 2048
# The columns that LLaMA-Factory reads when dataset_info.json names none, by format.
COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None},
    "sharegpt": {"messages": "conversations", "system": None},
}
TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


@dataclasses.dataclass
class Sample:
    """One example: the conversation to answer and the reference answer, or why it cannot run."""

    messages: list[dict]
    label: str = ""
    error: str | None = None


def read_samples(names: str | list[str], dataset_dir: str, max_samples: int | None = None) -> list[Sample]:
    """The samples of the datasets ``names`` (a list, or comma-separated) that ``dataset_dir/dataset_info.json``
    describes, the first ``max_samples`` of each. ValueError or FileNotFoundError says what is wrong."""
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no dataset_info.json in dataset_dir {dataset_dir}")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    samples = []
    for name in names:
        if name not in info:
            raise ValueError(f"dataset {name!r} is not in {info_path} (it has {', '.join(info) or 'none'})")
        entry = info[name]
        formatting = entry.get("formatting", "alpaca")
        if formatting not in COLUMNS:
            raise ValueError(f"dataset {name!r}: formatting {formatting!r} is not one of {', '.join(COLUMNS)}")
        columns = (
            {k: entry["columns"].get(k) for k in COLUMNS[formatting]} if "columns" in entry else COLUMNS[formatting]
        )
        tags = {**TAGS, **entry.get("tags", {})}
        for i, row in enumerate(_rows(dataset_dir, name, entry)[:max_samples]):
            try:
                samples.append(_alpaca(row, columns) if formatting == "alpaca" else _sharegpt(row, columns, tags))
            except (KeyError, TypeError, ValueError) as e:
                samples.append(Sample([], error=f"dataset {name!r} sample {i}: {type(e).__name__}: {e}"))
    return samples


def _rows(dataset_dir: str, name: str, entry: dict) -> list[dict]:
    """The records of a dataset's local ``file_name``: a JSON list, or JSON lines."""
    if "file_name" not in entry:
        raise ValueError(f"dataset {name!r} has no file_name: only local dataset files are read")
    path = os.path.join(dataset_dir, entry["file_name"])
    if not path.endswith((".json", ".jsonl")):
        raise ValueError(f"dataset {name!r}: {path} is not a .json or .jsonl file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except ValueError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(rows, list):
        raise ValueError(f"dataset {name!r}: {path} does not hold a list of records")
    return rows


def _alpaca(row: dict, columns: dict) -> Sample:
    """An alpaca record: ``history`` pairs, then the instruction and its input as one user turn."""
    history = (row.get(columns["history"]) or []) if columns["history"] else []
    messages = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
    query = "\n".join(row[c] for c in (columns["prompt"], columns["query"]) if c and row.get(c))
    system = row.get(columns["system"]) if columns["system"] else None
    messages = [*([{"role": "system", "content": system}] if system else []), *messages]
    label = row.get(columns["response"]) if columns["response"] else None
    return Sample([*messages, {"role": "user", "content": query}], label if isinstance(label, str) else "")


def _sharegpt(row: dict, columns: dict, tags: dict) -> Sample:
    """A sharegpt record: its turns by their role tags; a last answer is the label."""
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "assistant",
        tags["system_tag"]: "system",
    }
    turns = row[columns["messages"]]
    messages = []
    for turn in turns:
        if turn[tags["role_tag"]] not in roles:
            raise ValueError(f"role {turn[tags['role_tag']]!r} is none of the dataset's tags ({', '.join(roles)})")
        messages.append({"role": roles[turn[tags["role_tag"]]], "content": turn[tags["content_tag"]]})
    system = row.get(columns["system"]) if columns["system"] else None
    messages = with_system(messages, system or None)
    if messages and messages[-1]["role"] == "assistant":
        return Sample(messages[:-1], messages[-1]["content"])
    return Sample(messages)


def prompt_length(prompt: int, label: int, cutoff_len: int) -> int:
    """How many prompt tokens LLaMA-Factory keeps when prompt and label together may have ``cutoff_len``:
    a short label keeps its length, a short prompt all of its; else they share it in proportion."""
    if 2 * label < cutoff_len:
        label_room = cutoff_len
    elif 2 * prompt < cutoff_len:
        label_room = cutoff_len - prompt
    else:
        label_room = int(cutoff_len * label / (prompt + label))
    return min(prompt, max(cutoff_len - min(label, label_room), 0))


async def _predict(
    engine: AsyncEngine, sample: Sample, params: SamplingParams, cutoff_len: int
) -> AsyncIterator[tuple[dict, int]]:
    """The record of one sample and its output tokens; an engine ValueError becomes an error record."""
    record = {"prompt": "", "predict": "", "label": sample.label}
    if sample.error is not None:
        yield {**record, "error": sample.error}, 0
        return
    try:
        ids = await engine.tokenize(messages=sample.messages)
        label = await engine.tokenize(sample.label, add_special_tokens=False) if sample.label else []
        ids = ids[: prompt_length(len(ids), len(label), cutoff_len)]
        record["prompt"] = await engine.detokenize(ids)
        async with contextlib.aclosing(merge([engine.generate(ids, params)])) as merged:
            [final] = await fold(merged, 1)
    except ValueError as e:
        yield {**record, "error": str(e)}, 0
        return
    tokens = len(final.outputs[0].token_ids)
    yield {**record, "predict": final.outputs[0].text}, tokens


async def run_predict(
    engine: AsyncEngine, defaults: RequestDefaults, samples: list[Sample], output_dir: str, cutoff_len: int = CUTOFF_LEN
) -> BatchSummary:
    """Answer ``samples`` into ``output_dir/generated_predictions.jsonl``, one line each in order; a later run
    skips the lines already there. Each prompt keeps as many tokens as ``cutoff_len`` leaves it; ``defaults``
    give the sampling options and the system prompt of samples without one."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, PREDICTIONS)
    written = min(len([line for line in complete_lines(path) if line.strip()]), len(samples))
    await engine.start()
    params = dataclasses.replace(engine.default_sampling_params(), **defaults.sampling)
    todo = [dataclasses.replace(s, messages=with_system(s.messages, defaults.system)) for s in samples[written:]]
    jobs = (_predict(engine, sample, params, cutoff_len) for sample in todo)
    return await run_jobs(engine, jobs, path, BatchSummary(skipped=written), len(todo))
