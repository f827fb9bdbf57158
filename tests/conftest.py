"""Shared fixtures: one engine and one transformers model for the whole session."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; it must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_numpy24(tensor: type, scope: _interpreter._LangPatchScope) -> None:
        # Triton 3.6's interpreter takes int() of one-element arrays for loop bounds read from
        # memory, which numpy >= 2.4 refuses (triton-lang/triton#9171).
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _interpreter._patch_lang_tensor = _patch_lang_tensor_numpy24

    _convert_float = _interpreter._convert_float
    _TORCH_FLOATS = {
        tl.float32: torch.float32,
        tl.float16: torch.float16,
        tl.bfloat16: torch.bfloat16,
        tl.float8e4nv: torch.float8_e4m3fn,
    }
    _BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}

    def _convert_float_fp8_rne(
        data: np.ndarray, src: tl.dtype, dst: tl.dtype, rounding: _interpreter._ir.ROUNDING_MODE | None
    ) -> np.ndarray:
        # Triton 3.6's interpreter rounds to fp8 half-up and drops the mantissa's carry into the exponent
        # (halving some values: triton-lang/triton#8322, #11897), and reads fp8 NaN as 480. Torch rounds to
        # nearest even, as the GPU does.
        fp8 = tl.float8e4nv in (src, dst) and src in _TORCH_FLOATS and dst in _TORCH_FLOATS
        if not fp8 or rounding == _interpreter._ir.ROUNDING_MODE.RTZ:
            return _convert_float(data, src, dst, rounding)
        out = torch.from_numpy(np.ascontiguousarray(data)).view(_TORCH_FLOATS[src]).to(_TORCH_FLOATS[dst])
        return out.view(_BITS[out.element_size()]).numpy()

    _interpreter._convert_float = _convert_float_fp8_rne

import pytest  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tristream import AsyncEngine  # noqa: E402
from tristream.config import EngineConfig  # noqa: E402
from tristream.gpu_proc.runner import ModelRunner  # noqa: E402
from tristream.model_files import resolve_model  # noqa: E402
from tristream.protocol import BatchPlan, NewSequence  # noqa: E402
from tristream.sampling_params import SamplingParams  # noqa: E402


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache, one prompt at a time."""
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([ids], device=model.device), use_cache=True)
        for _ in range(n):
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            res = model(
                torch.tensor([[token]], device=model.device), past_key_values=res.past_key_values, use_cache=True
            )
    return out


def run_ours(path: str, prompts: list[list[int]], steps: int, page_size: int, **overrides) -> list[torch.Tensor]:
    """Prefill every prompt in one step, then decode greedily; returns each step's logits."""
    config = EngineConfig(model=path, max_model_len=256, page_size=page_size, kv_cache_tokens=4096, **overrides)
    runner = ModelRunner(config)
    captured: list[torch.Tensor] = []
    model_forward = runner.model.forward
    runner.model.forward = lambda batch, kv: captured.append(model_forward(batch, kv)) or captured[-1]
    pages_per_seq = 256 // page_size
    plan = BatchPlan(
        0,
        new=[NewSequence(i, p, 0, 0, SamplingParams(temperature=0, seed=0)) for i, p in enumerate(prompts)],
        pages=[(i, list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq))) for i in range(len(prompts))],
        slots=list(range(len(prompts))),
        num_tokens=[len(p) for p in prompts],
        sample=[True] * len(prompts),
    )
    runner.step(plan)
    for step in range(steps):
        runner.step(
            BatchPlan(
                step + 1, slots=list(range(len(prompts))), num_tokens=[1] * len(prompts), sample=[True] * len(prompts)
            )
        )
    return captured


def hf_logits(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """transformers' last-position logits after ``prompt``, then after each of ``steps`` greedy tokens."""
    rows = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps + 1):
            rows.append(res.logits[0, -1])
            token = int(res.logits[0, -1].argmax())
            res = model(torch.tensor([[token]]), past_key_values=res.past_key_values, use_cache=True)
    return rows


def random_hf_model(path, fields: dict, norm_offset: float = 0.0, **load: object):
    """transformers' model of ``fields`` (its ``model_type`` and config), every weight (and a router's
    score-correction buffer) redrawn N(0, 0.2) from seed 0, norm weights plus ``norm_offset``, saved at ``path``.
    ``load`` goes to ``from_config``."""
    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **load).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if "norm" in name:
                p.add_(norm_offset)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


# Chat templates of the tiny vision-language models: Qwen2-VL's and LLaVA-1.5's image placeholders.
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m.role | upper }}: {% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}{% if p.type == 'image' %}<image>\n{% else %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def random_vision_model(path, model_type: str):
    """A tiny random vision-language model of ``model_type`` (qwen2_5_vl, qwen2_vl or llava) saved at ``path``
    with the bundled tokenizer plus its image tokens, a chat template that places images, and an image processor
    made from its class's defaults (Qwen: 56x56 to 224x224 pixels; LLaVA: 56x56 crops, 16 tokens an image).
    Returns transformers' model."""
    from transformers import AutoModelForImageTextToText, CLIPImageProcessorPil, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    llava = model_type == "llava"
    special = ["<image>"] if llava else ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": special})
    ids = tok.convert_tokens_to_ids(special)
    tok.chat_template = LLAVA_TEMPLATE if llava else QWEN_VL_TEMPLATE
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    if llava:
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        )
        config = AutoConfig.for_model(
            "llava", text_config=dict(model_type="llama", **text), vision_config=vision, image_token_id=ids[0]
        )
        processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    else:
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        vision = (
            dict(
                depth=2,
                hidden_size=32,
                num_heads=2,
                intermediate_size=64,
                out_hidden_size=64,
                fullatt_block_indexes=[1],
                window_size=56,
            )
            if model_type == "qwen2_5_vl"
            else dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        )
        config = AutoConfig.for_model(
            model_type,
            text_config=text,
            vision_config=vision,
            image_token_id=ids[2],
            vision_start_token_id=ids[0],
            vision_end_token_id=ids[1],
        )
        processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return model


def random_image(seed: int, width: int = 224, height: int = 168):
    """A PIL image of random RGB noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def qwen_vl_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2.5-VL model directory, made once."""
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    random_vision_model(path, "qwen2_5_vl")
    return str(path)


def make_lora_adapter(model_dir: str, path, seed: int, scale: float = 0.05, **lora: object):
    """Save a PEFT LoRA adapter of ``model_dir`` with random A and B (times ``scale``) to ``path``;
    return peft's merged model of it, in fp32 on the CPU."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(path))
    return model.merge_and_unload().eval()


# A model to split over ranks: Qwen2 (biased q/k/v), one KV head shared by both ranks, and a vocabulary and MLP that split unevenly.
TINY = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 1001,
    "hidden_size": 64,
    "intermediate_size": 129,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
}


@pytest.fixture
def tiny_model(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return str(tmp_path)


def tiny_engine(model: str, tp: int, **overrides: object) -> AsyncEngine:
    """An engine of ``tp`` ranks on the random weights of ``tiny_model``, without a tokenizer."""
    args = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=256, log_level="ERROR")
    return AsyncEngine(model=model, tensor_parallel_size=tp, **{**args, **overrides})


async def generate_all(engine: AsyncEngine, prompts: list, params: SamplingParams) -> list:
    """Each prompt's tokens and logprobs, the prompts run at once."""

    async def one(prompt):
        tokens, logprobs = [], []
        async for out in engine.generate(prompt, params):
            tokens += out.outputs[0].token_ids
            logprobs += out.outputs[0].logprobs or []
        return tokens, logprobs

    return await asyncio.gather(*(one(p) for p in prompts))


@pytest.fixture(scope="session")
def model_dir() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
async def engine():
    async with AsyncEngine(max_model_len=1024, check_invariants=True, log_level="WARNING") as eng:
        yield eng


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """Wait up to ``timeout`` s for the processes ``pids`` to end; those still alive then."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.fixture(scope="session")
def alive():
    """``alive(pid)``: True while the process runs (a zombie counts as gone)."""
    return _alive


@dataclass
class LiveServer:
    """A ``tristream serve`` subprocess on the bundled model."""

    url: str
    proc: subprocess.Popen
    model: str
    log: list[str]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False


def start_server(*args: str, timeout: float = 180.0) -> LiveServer:
    """Run ``tristream serve --port 0 ARGS`` and wait until it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tristream", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"serving (\S+) at (http://\S+)/v1", line)
        if m:
            # Keep draining the output so that the server never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return LiveServer(m.group(2), proc, m.group(1), lines)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("tristream serve did not start:\n" + "".join(lines))


def stop_server(server: LiveServer) -> None:
    """SIGTERM, and a kill (and a failure) if the server has not exited 30 s later."""
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


@pytest.fixture(scope="session")
def live_server():
    """One server on the bundled model for every HTTP test."""
    server = start_server("--max-model-len", "1024", "--log-level", "WARNING")
    yield server
    stop_server(server)


# The vision-language server's image limits, which tests/test_server_images.py checks.
VL_MAX_IMAGE_BYTES = 200_000
VL_FETCH_TIMEOUT = 2.0


@pytest.fixture(scope="session")
def vl_media_dir(tmp_path_factory):
    """The folder the vision-language server may read images from."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def vl_server(qwen_vl_dir, vl_media_dir):
    """One server on the tiny Qwen2.5-VL model for the image tests, local files allowed only in ``vl_media_dir``."""
    server = start_server(
        qwen_vl_dir,
        *("--max-model-len", "1024", "--log-level", "WARNING", "--disable-log-requests"),
        *("--allowed-local-media-path", str(vl_media_dir)),
        *("--max-image-bytes", str(VL_MAX_IMAGE_BYTES), "--image-fetch-timeout", str(VL_FETCH_TIMEOUT)),
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of two CPUs for a module's tests that place work on Ray (stopped after them, so that
    its daemons do not take CPU from the tests after)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def scrape():
    """``scrape(server)``: its /metrics samples, by name and labels (``model_name`` left out)."""

    def read(server: LiveServer) -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples

    return read
