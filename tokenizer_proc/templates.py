"""Chat templates by name, or from a Jinja file, to override the tokenizer's own.

The names are tristream's (``chatml``, ``hermes``, ``qwen``, ``llama3``, ``default-generation``) and LLaMA-Factory's for the
common model families; a LLaMA-Factory name renders the text that LLaMA-Factory's template of that name does.
"""

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
# ChatML that shows the model its tools and the Hermes call format: calls as <tool_call> JSON blocks, results
# in <tool_response> blocks of a user turn.
HERMES = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{% set rest = messages[1:] if messages and messages[0]['role'] == 'system' else messages %}"
    "{% if system or tools %}<|im_start|>system\n{{ system }}"
    "{% if tools %}{{ '\n\n' if system else '' }}You can call these functions, described as JSON schemas "
    "inside <tools></tools>:\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "To call one, answer with its name and arguments as a JSON object in a <tool_call></tool_call> block:\n"
    '<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
    "{% endif %}<|im_end|>\n{% endif %}"
    "{% for m in rest %}"
    "{% if m['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for call in m.get('tool_calls') or [] %}{% set f = call['function'] if 'function' in call else call %}"
    "{{ '\n' if m['content'] or not loop.first else '' }}<tool_call>\n"
    "{\"name\": {{ f['name'] | tojson }}, \"arguments\": {{ f['arguments'] | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def turns(
    user: str,
    assistant: str,
    header: str = "",
    system: str = "{content}",
    prefix: str = "",
    default_system: str = "",
    system_in_user: bool = False,
) -> str:
    """The Jinja text of a template declared as LLaMA-Factory declares one.

    ``user``, ``assistant`` and ``system`` are the text of a turn around ``{content}``; ``header`` opens the
    assistant's turn (the generation prompt); ``prefix`` opens the conversation; ``{bos}`` and ``{eos}`` are
    those tokens. The system prompt, or ``default_system`` when the messages have none, comes first, or with
    ``system_in_user`` (Llama 2, Mistral, Gemma) at the start of the first user turn.
    """

    def slot(text: str, content: str) -> str:
        tokens = text.replace("{bos}", "{{ bos_token }}").replace("{eos}", "{{ eos_token }}")
        return tokens.replace("{content}", "{{ " + content + " }}")

    own_system = "messages and messages[0]['role'] == 'system'"
    system_text = "{% if system %}" + slot(system, "system") + "{% endif %}"
    before, _, after = slot(user, "m['content']").partition("{{ m['content'] }}")
    first = "{% if loop.first %}" + system_text + "{% endif %}" if system_in_user else ""
    return (
        f"{{% set system = messages[0]['content'] if {own_system} else {default_system!r} %}}"
        f"{{% set rest = messages[1:] if {own_system} else messages %}}"
        + slot(prefix, "")
        + ("" if system_in_user else system_text)
        + "{% for m in rest %}{% if m['role'] == 'assistant' %}"
        + slot(header + assistant, "m['content']")
        + "{% else %}"
        + before
        + first
        + "{{ m['content'] }}"
        + after
        + "{% endif %}{% endfor %}{% if add_generation_prompt %}"
        + header
        + "{% endif %}"
    )


BUILTIN_TEMPLATES = {
    "chatml": CHATML,
    "qwen": QWEN,
    "llama3": LLAMA3,
    "default-generation": DEFAULT_GENERATION,
    "hermes": HERMES,
    # LLaMA-Factory's names.
    "empty": DEFAULT_GENERATION,
    "yi": CHATML,
    "qwen3": CHATML,
    "default": turns(
        "Human: {content}{eos}\n", "{content}{eos}\n", header="Assistant:", system="System: {content}{eos}\n"
    ),
    "alpaca": turns(
        "### Instruction:\n{content}\n\n",
        "{content}{eos}\n\n",
        header="### Response:\n",
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n",
    ),
    "vicuna": turns(
        "USER: {content} ",
        "{content}{eos}",
        header="ASSISTANT:",
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
    "llama2": turns(
        "{bos}[INST] {content} [/INST]",
        "{content}{eos}",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        system_in_user=True,
    ),
    "mistral": turns(
        "[INST] {content}[/INST]", " {content}{eos}", system="{content}\n\n", prefix="{bos}", system_in_user=True
    ),
    "gemma": turns(
        "<start_of_turn>user\n{content}<end_of_turn>\n",
        "{content}<end_of_turn>\n",
        header="<start_of_turn>model\n",
        system="{content}\n\n",
        prefix="{bos}",
        system_in_user=True,
    ),
    "phi": turns(
        "<|user|>\n{content}<|end|>\n",
        "{content}<|end|>\n",
        header="<|assistant|>\n",
        system="<|system|>\n{content}<|end|>\n",
    ),
    "zephyr": turns(
        "<|user|>\n{content}{eos}",
        "{content}{eos}",
        header="<|assistant|>\n",
        system="<|system|>\n{content}{eos}",
        default_system="You are Zephyr, a helpful assistant.",
    ),
    "deepseek": turns(
        "User: {content}\n\n", "{content}{eos}", header="Assistant:", system="{content}\n\n", prefix="{bos}"
    ),
}


def resolve_chat_template(value: str) -> str:
    """The Jinja text of a built-in template name or of a template file; Jinja text as it is."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text()
    raise ValueError(
        f"chat_template {value!r} is neither a file nor a built-in template ({', '.join(BUILTIN_TEMPLATES)})"
    )
