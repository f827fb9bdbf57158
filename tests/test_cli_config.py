"""YAML config files, chat templates by name or file, and reasoning through the server."""

from __future__ import annotations

import json

import httpx
import pytest
from transformers import AutoTokenizer

from tristream import AsyncEngine
from tristream.cli import _defaults, _engine, _runtime_lora, parse_args
from tristream.openai_api import RequestDefaults
from tristream.server import build_app
from tristream.tokenizer_proc.templates import BUILTIN_TEMPLATES, resolve_chat_template


def write(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_sets_defaults_that_flags_override(tmp_path):
    config = write(
        tmp_path,
        "model_name_or_path: /models/m\ntemplate: chatml\nport: 9000\nmax-model-len: 512\n"
        "api_key: k\ninfer_backend: vllm\n",
    )
    args = parse_args(["serve", config])
    assert (args.model, args.chat_template, args.port, args.max_model_len, args.api_key) == (
        "/models/m",
        "chatml",
        9000,
        512,
        "k",
    )
    args = parse_args(["serve", config, "--port", "9100", "--model", "/models/other"])
    assert (args.port, args.model, args.max_model_len) == (9100, "/models/other", 512)


def test_runtime_lora_loading_from_flag_env_and_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    args = parse_args(["serve"])
    assert (_runtime_lora(args), args.lora_root) == (False, None)
    args = parse_args(["serve", "--enable-lora-runtime-loading", "--lora-root", "/adapters"])
    assert (_runtime_lora(args), args.lora_root) == (True, "/adapters")
    args = parse_args(["webchat", write(tmp_path, "enable_lora_runtime_loading: true\nlora_root: /adapters\n")])
    assert (_runtime_lora(args), args.lora_root) == (True, "/adapters")
    for value, on in [("1", True), ("True", True), ("true", True), ("0", False), ("false", False), ("", False)]:
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
        assert _runtime_lora(parse_args(["serve"])) is on, value


def test_yaml_sampling_keys_for_chat_and_batch(tmp_path):
    chat = parse_args(["chat", write(tmp_path, "max_new_tokens: 77\ntemperature: 0.2\ndefault_system: Be brief.\n")])
    assert (chat.max_tokens, chat.temperature, chat.system) == (77, 0.2, "Be brief.")
    batch = parse_args(["batch", write(tmp_path, "input: in.jsonl\noutput: out.jsonl\ntop_k: 5\n", "b.yaml")])
    assert (batch.input, batch.output, batch.top_k) == ("in.jsonl", "out.jsonl", 5)


@pytest.mark.parametrize(
    "text, words",
    [
        ("frobnicate: 1\n", ["unknown key", "frobnicate"]),
        ("system: hi\n", ["unknown key", "system"]),
        ("- a list\n", ["mapping"]),
        ("port: [unclosed\n", ["not valid YAML"]),
        ("adapter_name_or_path: saves/a, saves/b\n", ["2 adapters", "one adapter per request", "lora_modules"]),
        ("lora_modules: [a]\n", ["lora_modules", "'a' is not NAME=PATH"]),
        ("lora_modules: /x\n", ["NAME=PATH items or a mapping"]),
    ],
)
def test_bad_yaml_is_an_error_that_says_why(tmp_path, capsys, text, words):
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", write(tmp_path, text)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_config_must_be_yaml_and_exist(tmp_path, capsys):
    for arg in ("config.json", str(tmp_path / "missing.yaml")):
        with pytest.raises(SystemExit):
            parse_args(["serve", arg])
    err = capsys.readouterr().err
    assert ".yaml or .yml" in err and "does not exist" in err


def test_builtin_templates_render(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == own
    tokenizer.chat_template = BUILTIN_TEMPLATES["default-generation"]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "Be brief.Hi"
    tokenizer.chat_template = BUILTIN_TEMPLATES["qwen"]
    assert tokenizer.apply_chat_template(messages[1:], tokenize=False).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
    )
    with pytest.raises(ValueError, match="neither a file nor a built-in"):
        resolve_chat_template("no-such-template")


async def test_reasoning_content_through_the_server(tmp_path):
    """A template that opens <think> puts what the model writes first into reasoning_content."""
    template = write(
        tmp_path,
        BUILTIN_TEMPLATES["chatml"].replace(
            "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"
        ),
        "think.jinja",
    )
    assert "<think>" in (tmp_path / "think.jinja").read_text()
    body = {
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with AsyncEngine(
        chat_template=template, reasoning_parser="think", max_model_len=512, log_level="WARNING"
    ) as engine:
        transport = httpx.ASGITransport(app=build_app(engine, "m"))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            whole = (await http.post("/v1/chat/completions", json=body)).json()
            streamed = (await http.post("/v1/chat/completions", json={**body, "stream": True})).text
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] and "<think>" not in message["reasoning_content"]
    chunks = [json.loads(e[6:]) for e in streamed.split("\n\n") if e.startswith("data: {")]
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert reasoning == message["reasoning_content"] and content == message["content"]


def test_tensor_parallel_size_from_flag_or_yaml(tmp_path):
    assert parse_args(["serve", "--tp", "2"]).tensor_parallel_size == 2
    assert parse_args(["chat", "--tensor-parallel-size", "4"]).tensor_parallel_size == 4
    assert parse_args(["serve", write(tmp_path, "tensor_parallel_size: 2\n")]).tensor_parallel_size == 2
    assert parse_args(["serve"]).tensor_parallel_size == 1


def test_lora_flags_reach_the_engine_and_the_requests():
    args = parse_args(
        ["chat", "--lora-modules", "a=/x", "b=/y", "--max-loras", "3", "--max-lora-rank", "8", "--lora", "b"]
    )
    config = _engine(args).config
    assert (config.lora_adapters, config.max_loras, config.max_lora_rank) == ({"a": "/x", "b": "/y"}, 3, 8)
    assert _defaults(args).sampling["lora"] == "b"
    plain = parse_args(["serve"])
    assert (_engine(plain).config.lora_adapters, plain.lora) == (None, None)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--lora-modules", "a=/x", "nopath"], ["--lora-modules", "'nopath' is not NAME=PATH"]),
        (["--lora-modules", "a=/x", "a=/y"], ["'a' is given twice"]),
        (["--lora-modules", "a=/x", "--lora", "b"], ["--lora b", "a"]),
        (["--lora", "b"], ["--lora b", "none given"]),
    ],
)
def test_bad_lora_flags_are_errors_that_say_why(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_yaml_adapter_name_or_path_loads_it_and_makes_it_the_default(tmp_path):
    config = write(
        tmp_path,
        "model_name_or_path: /models/m\nadapter_name_or_path: saves/llama3-8b/lora/sft/\n"
        "finetuning_type: lora\nlora_modules:\n  other: /adapters/other\n",
    )
    args = parse_args(["chat", config])
    assert args.lora_adapters == {"other": "/adapters/other", "sft": "saves/llama3-8b/lora/sft/"}
    assert args.lora == "sft" and _defaults(args).sampling["lora"] == "sft"
    args = parse_args(["serve", write(tmp_path, "lora_modules: [a=/x, b=/y]\nlora: b\n", "list.yaml")])
    assert (args.lora_adapters, args.lora) == ({"a": "/x", "b": "/y"}, "b")


def test_every_engine_argument_is_a_flag_with_the_engines_default():
    from dataclasses import fields

    from tristream.cli import engine_args
    from tristream.config import EngineConfig

    args = parse_args(["serve"])
    assert engine_args(args) == {f.name: f.default for f in fields(EngineConfig)}
    flags = [
        "--skip-tokenizer-init",
        "--schedule-policy",
        "lpm",
        "--seed",
        "7",
        "--tp",
        "2",
        "--no-pipelined",
        "--lora-modules",
        "a=/adapters/a",
        "--gpu-memory-utilization",
        "0.5",
    ]
    args = parse_args(["chat", *flags])
    assert (args.skip_tokenizer_init, args.schedule_policy, args.seed, args.tensor_parallel_size) == (True, "lpm", 7, 2)
    assert (args.pipelined, args.lora_adapters, args.gpu_memory_utilization) == (False, {"a": "/adapters/a"}, 0.5)


def test_help_shows_each_flag_and_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-num-seqs MAX_NUM_SEQS most requests running at once (default: 64)" in out
    assert "--seed SEED seeds the per-request seeds of requests that give none (default: 0)" in out
    assert "--port PORT" in out and "(default: 8000)" in out


def test_the_first_argument_is_a_model_or_a_config_file(tmp_path, capsys):
    for command in ("serve", "webchat", "chat"):
        assert parse_args([command, "/models/m"]).model == "/models/m"
    assert parse_args(["batch", "/models/m", "--input", "in.jsonl", "--output", "out.jsonl"]).model == "/models/m"
    config = write(tmp_path, "model: /models/from-yaml\nmax_model_len: 256\n")
    args = parse_args(["serve", config])
    assert (args.model, args.max_model_len) == ("/models/from-yaml", 256)
    with pytest.raises(SystemExit):
        parse_args(["serve", "/models/m", "--model", "/models/other"])
    assert "the model is given twice" in capsys.readouterr().err


def test_version(capsys):
    import importlib.metadata

    import tristream

    assert tristream.__version__ == importlib.metadata.version("tristream")
    with pytest.raises(SystemExit) as info:
        parse_args(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"tristream {tristream.__version__}"


COMMANDS = ["generate x", "demo", "serve", "webchat", "chat", "batch --input i --output o"]


@pytest.mark.parametrize("command", COMMANDS)
def test_one_set_of_sampling_defaults_shown_in_every_help(capsys, command):
    """No sampling flag: no default of the command's own, so a request takes the model's and SamplingParams';
    only the demo, which shows the engine on fixed prompts, gives short greedy answers of its own."""
    argv = command.split()
    demo = argv[0] == "demo"
    assert _defaults(parse_args(argv)).sampling == ({"temperature": 0.0, "max_tokens": 128} if demo else {})
    with pytest.raises(SystemExit):
        parse_args([argv[0], "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        f"--temperature TEMPERATURE 0 is greedy (default: {0.0 if demo else 1.0})",
        "--top-p TOP_P nucleus sampling: keep the most likely tokens up to this probability (default: 1.0)",
        "--top-k TOP_K keep the k most likely tokens; 0 keeps all (default: 0)",
        "--max-tokens MAX_TOKENS most tokens to generate (default: "
        + ("128)" if demo else "until EOS or the context; 16 for a"),
        "--repetition-penalty REPETITION_PENALTY over prompt and output tokens; 1 is off (default: 1.0)",
    ):
        assert text in out
    flags = "--temperature 0.5 --top-p 0.9 --max-tokens 7 --stop END --ignore-eos".split()
    assert _defaults(parse_args([*argv, *flags])).sampling == {
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 7,
        "stop": ["END"],
        "ignore_eos": True,
    }


LLAMA_FACTORY = """\
template: chatml
default_system: You are terse.
temperature: 0.3
top_p: 0.8
max_new_tokens: 20
vllm_maxlen: 512
do_predict: true
eval_dataset: alpaca_demo
dataset_dir: data
output_dir: saves/predict
cutoff_len: 256
stage: sft
finetuning_type: lora
per_device_eval_batch_size: 1
predict_with_generate: true
deepspeed: ds_z3.json
"""


@pytest.mark.parametrize("command", ["chat", "webchat", "serve", "batch"])
def test_one_llama_factory_yaml_serves_every_command(tmp_path, caplog, command):
    config = write(tmp_path, LLAMA_FACTORY)
    with caplog.at_level("WARNING", logger="tristream"):
        args = parse_args([command, config])
    defaults = _defaults(args)
    assert defaults == RequestDefaults({"temperature": 0.3, "top_p": 0.8, "max_tokens": 20}, "You are terse.")
    assert (args.chat_template, args.max_model_len) == ("chatml", 512)
    ignored = {m.split(": ")[1].split()[0] for m in caplog.messages if "is ignored" in m}
    assert {"stage", "finetuning_type", "per_device_eval_batch_size", "predict_with_generate", "deepspeed"} <= ignored
    prediction = {"do_predict", "eval_dataset", "dataset_dir", "output_dir", "cutoff_len"}
    if command == "batch":
        assert (args.eval_dataset, args.dataset_dir, args.output_dir, args.cutoff_len) == (
            "alpaca_demo",
            "data",
            "saves/predict",
            256,
        )
        assert not ignored & prediction
    else:
        assert prediction <= ignored
        assert all("only `tristream batch`" in m for m in caplog.messages if m.split(": ")[1].split()[0] in prediction)


def test_llama_factory_do_sample_false_is_greedy(tmp_path):
    args = parse_args(["serve", write(tmp_path, "do_sample: false\ntemperature: 0.9\ntop_k: 5\n")])
    assert _defaults(args).sampling == {"temperature": 0.0, "top_k": 5}
    args = parse_args(["serve", write(tmp_path, "do_sample: true\ntemperature: 0.9\n", "b.yaml")])
    assert _defaults(args).sampling == {"temperature": 0.9}


def test_api_port_and_host_set_the_server_address(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("API_PORT", "9123")
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    args = parse_args(["serve"])
    assert (args.host, args.port) == ("0.0.0.0", 9123)
    assert parse_args(["serve", "--port", "9200", "--host", "127.0.0.2"]).port == 9200
    assert parse_args(["serve", write(tmp_path, "port: 9300\n")]).port == 9300
    assert (parse_args(["webchat"]).port, parse_args(["webchat"]).host) == (8000, "127.0.0.1")
    monkeypatch.setenv("API_PORT", "eighty")
    with pytest.raises(SystemExit):
        parse_args(["serve"])
    assert "invalid int value: 'eighty'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["chat", "--chat-template", "qwen2.5"], ["serve", "--chat-template", "/no/such.jinja"]]
)
def test_a_bad_template_name_is_refused_before_anything_starts(capsys, argv):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "is neither a file nor a built-in template" in err
    assert "llama3, " in err and "mistral" in err and "Traceback" not in err


def test_llama_factory_templates_render_as_llama_factory_does(model_dir):
    """The text each template of LLaMA-Factory's template.py gives, with the bundled model's bos and eos."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    system, user, answer, again = "Be brief.", "Hi", "Hello", "Bye"
    conversation = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": again},
    ]
    expected = {
        "default": f"System: {system}{eos}\nHuman: {user}{eos}\nAssistant:{answer}{eos}\nHuman: {again}{eos}\nAssistant:",
        "mistral": f"{bos}[INST] {system}\n\n{user}[/INST] {answer}{eos}[INST] {again}[/INST]",
        "llama2": f"{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]{answer}{eos}{bos}[INST] {again} [/INST]",
        "gemma": f"{bos}<start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n{answer}"
        f"<end_of_turn>\n<start_of_turn>user\n{again}<end_of_turn>\n<start_of_turn>model\n",
        "empty": system + user + answer + again,
        "chatml": tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
    }
    for name, text in expected.items():
        tokenizer.chat_template = resolve_chat_template(name)
        assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == text, name
    tokenizer.chat_template = resolve_chat_template("alpaca")
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    ) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{user}\n\n### Response:\n"
    )
