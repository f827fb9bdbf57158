"""Chat templates by name, or from a Jinja file, to override the tokenizer's own."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + CHATML
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DEFAULT_GENERATION = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

BUILTIN_TEMPLATES = {"chatml": CHATML, "qwen": QWEN, "llama3": LLAMA3, "default-generation": DEFAULT_GENERATION}


def resolve_chat_template(value: str) -> str:
    """The Jinja text of a built-in template name or of a template file."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value)
    if path.is_file():
        return path.read_text()
    raise ValueError(
        f"chat_template {value!r} is neither a file nor a built-in template ({', '.join(BUILTIN_TEMPLATES)})"
    )
