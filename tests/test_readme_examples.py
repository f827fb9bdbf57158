"""The README's examples run as written: each ```python block right after a `<!-- example: NAME -->` line,
in a process of its own, on the bundled model. Every "Coming from ..." section has exactly one, and the
LLaMA-Factory section's YAML is a config file that `tristream chat` accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tristream.cli import parse_args
from tristream.model_files import resolve_model

README = Path(__file__).resolve().parents[1] / "README.md"
ORIGINS = ("vLLM", "LMDeploy", "ms-swift", "FastDeploy", "LLaMA-Factory")
EXAMPLE = re.compile(r"^<!-- example: ([\w-]+) -->\n```python\n(.*?)^```$", re.M | re.S)
MARKER = re.compile(r"^<!-- example: ", re.M)
ADAPTER_PLACEHOLDER = '"path/to/adapter"'


def headed(text: str, level: int) -> dict[str, str]:
    """Each heading of ``level`` (#'s) to the text below it, up to the next heading of that level or higher.

    Lines inside ``` fences (a YAML comment, a shell prompt) are never headings.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#+) (.*)$", line)
        if m and len(m.group(1)) <= level:
            current = sections.setdefault(m.group(2).strip(), []) if len(m.group(1)) == level else None
        elif current is not None:
            current.append(line)
    return {head: "".join(lines) for head, lines in sections.items()}


def examples() -> dict[str, str]:
    found = EXAMPLE.findall(README.read_text())
    return dict(found)


def origin_sections() -> dict[str, str]:
    return headed(headed(README.read_text(), 2)["Coming from other engines"], 3)


def test_every_origin_has_its_section_with_one_example():
    text = README.read_text()
    top = [h for h in headed(text, 2)]
    assert top.index("Python API") < top.index("Coming from other engines") < top.index("Scheduling and KV memory")
    sections = origin_sections()
    assert list(sections) == [f"Coming from {o}" for o in ORIGINS]
    for name, body in sections.items():
        assert len(MARKER.findall(body)) == 1, f"{name} needs exactly one example marker"
        assert len(EXAMPLE.findall(body)) == 1, f"{name}: its marker must be followed by a ```python block"
        assert body.count("```python") == 1, f"{name} has a python block that no test runs"
        assert "| --- | --- |" in body, f"{name} needs its table of calls"
    python_api = headed(headed(text, 2)["Python API"], 3)
    assert "LoRA adapters" in python_api and len(EXAMPLE.findall(python_api["LoRA adapters"])) == 1
    # every marker is followed by a block, and names are unique
    assert len(MARKER.findall(text)) == len(EXAMPLE.findall(text)) == len(examples())


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> str:
    """A small PEFT LoRA adapter of the bundled model, with random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("lora") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("name", sorted(examples()))
def test_example_runs(name, tmp_path, request):
    code = examples()[name]
    if name == "lora":
        assert ADAPTER_PLACEHOLDER in code
        code = code.replace(ADAPTER_PLACEHOLDER, repr(request.getfixturevalue("adapter_dir")))
    assert "/models/" not in code, "examples run on the bundled model"
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"example {name} failed:\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"example {name} printed nothing"
    # the examples print answers with repr(): none of them is empty
    assert not any(re.search(r"(^|\s)''(\s|$)", line) for line in lines), lines
    if name == "lora":
        assert lines == [lines[0], lines[1], "['again', 'mine']"] and lines[0].startswith("base: '")
        assert lines[1].startswith("mine: '")


def test_llama_factory_yaml_is_a_chat_config(tmp_path, adapter_dir):
    body = origin_sections()["Coming from LLaMA-Factory"]
    (yaml_text,) = re.findall(r"^```yaml\n(.*?)^```$", body, re.M | re.S)
    model = re.search(r"^model_name_or_path: (.*)$", yaml_text, re.M).group(1)
    adapter = re.search(r"^adapter_name_or_path: (.*)$", yaml_text, re.M).group(1)
    assert os.path.basename(adapter) == "sft"  # the name the README says it gets
    sft = Path(tmp_path) / "sft"
    sft.symlink_to(adapter_dir)
    config = tmp_path / "chat.yaml"
    config.write_text(yaml_text.replace(model, resolve_model(None)).replace(adapter, str(sft)))
    args = parse_args(["chat", str(config)])
    assert args.model == resolve_model(None)
    assert args.lora_adapters == {"sft": str(sft)} and args.lora == "sft"
    assert args.chat_template == "qwen"
    assert (args.system, args.temperature, args.max_tokens) == ("You are a helpful assistant.", 0.7, 512)
    # webchat, serve and batch take the same file: its sampling keys and system prompt are their defaults
    for argv in (["webchat"], ["serve"], ["batch", "--input", "in.jsonl", "--output", "out.jsonl"]):
        same = parse_args([argv[0], str(config), *argv[1:]])
        assert (same.model, same.lora, same.chat_template) == (resolve_model(None), "sft", "qwen")
        assert (same.default_system, same.temperature, same.max_tokens) == ("You are a helpful assistant.", 0.7, 512)
    # the bundled model is the one a file names by leaving model_name_or_path out, or null
    for text in (yaml_text.replace(f"model_name_or_path: {model}\n", ""), yaml_text.replace(model, "null")):
        config.write_text(text.replace(adapter, str(sft)))
        assert parse_args(["chat", str(config)]).model is None
