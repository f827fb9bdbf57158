"""Code from the documentation of vLLM, FastDeploy, LMDeploy and ms-swift runs on tristream as it is written.

Each snippet below is copied verbatim from the page cited above it. The test changes only what its
``swaps`` name, each found exactly once: the import; the model (or adapter) path, which becomes the
bundled model (or a LoRA adapter of it, or for a vision-language model a tiny LLaVA-1.5); an image's
URL or file, which becomes ``image.png`` beside the snippet; and where a page asks for a float16 model
or for hundreds of new tokens, float32 and a few dozen, which a CPU runs in seconds. A snippet that is a
fragment of its page gets the lines the page leaves to the reader, marked as such, and every snippet
gets ``checks`` after it. Each runs in a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import (  # pytest has imported the conftest under this name
    make_lora_adapter,
    random_image,
    random_vision_model,
)
from tristream.model_files import resolve_model

MODEL = "MODEL"  # stands for the bundled model's directory in the swaps
VISION_MODEL = "VISION_MODEL"  # stands for the tiny LLaVA-1.5's directory


@dataclass
class Snippet:
    code: str
    swaps: dict[str, str]
    checks: str
    adapter: bool = False
    vision: bool = False


SNIPPETS = {
    # vLLM, as its users' deployment guides call it (the LLaMA3 deployment notes of datawhalechina/self-llm,
    # "vllm inference acceleration"), on vLLM's generate(prompts=None, sampling_params=None, prompt_token_ids=None)
    # and get_tokenizer() (https://docs.vllm.ai/en/v0.5.0.post1/_modules/vllm/entrypoints/llm.html).
    "vllm-prompt-token-ids": Snippet(
        code="""\
from vllm import LLM, SamplingParams  # left to the reader, as are the model path, the tokenizer and the input

model_name_or_path = 'MODEL'
model = LLM(model=model_name_or_path, dtype='float16')
tokenizer = model.get_tokenizer()
messages = [{"role": "user", "content": "What is the capital of France? One word."}]
input_str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
input_ids = tokenizer.encode(input_str, add_special_tokens=False)
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, max_tokens=512)
outputs = model.generate(prompts=None, sampling_params=sampling_params, prompt_token_ids=[input_ids])
response = outputs[0].outputs[0].text
""",
        swaps={"from vllm import": "from tristream import", "'MODEL'": MODEL, "'float16'": "'float32'"},
        checks="assert outputs[0].prompt_token_ids == input_ids and response, outputs\nprint(repr(response))\n",
    ),
    # FastDeploy, https://paddlepaddle.github.io/FastDeploy/offline_inference (docs/offline_inference.md),
    # "Chat Interface (LLM.chat)".
    "fastdeploy-chat": Snippet(
        code="""\
from fastdeploy import LLM, SamplingParams

msg1=[
    {"role": "system", "content": "I'm a helpful AI assistant."},
    {"role": "user", "content": "把李白的静夜思改写为现代诗"},
]
msg2 = [
    {"role": "system", "content": "I'm a helpful AI assistant."},
    {"role": "user", "content": "Write me a poem about large language model."},
]
messages = [msg1, msg2]

# Sampling parameters
sampling_params = SamplingParams(top_p=0.95, max_tokens=6400)

# Load model
llm = LLM(model="ERNIE-4.5-0.3B", tensor_parallel_size=1, max_model_len=8192)
# Batch inference (internal request queuing and dynamic batching)
outputs = llm.chat(messages, sampling_params)

# Output results
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs.text
""",
        swaps={
            "from fastdeploy import": "from tristream import",
            '"ERNIE-4.5-0.3B"': MODEL,
            "max_tokens=6400": "max_tokens=48",
        },
        checks="""\
for output in outputs:
    assert output.prompt.startswith("<|im_start|>system\\nI'm a helpful AI assistant.<|im_end|>"), output.prompt
    assert output.outputs.text == output.outputs[0].text and output.error_code == 200
    print(repr(output.outputs.text), output.outputs.send_idx, output.metrics.model_execute_time > 0)
""",
    ),
    # FastDeploy, the same page, "Text Completion Interface (LLM.generate)".
    "fastdeploy-generate": Snippet(
        code="""\
from fastdeploy import LLM, SamplingParams

prompts = [
    "User: 帮我写一篇关于深圳文心公园的500字游记和赏析。\\nAssistant: 好的。"
]

# 采样参数
sampling_params = SamplingParams(top_p=0.95, max_tokens=6400)

# 加载模型
llm = LLM(model="baidu/ERNIE-4.5-21B-A3B-Base-Paddle", tensor_parallel_size=1, max_model_len=8192)

# 批量进行推理（llm内部基于资源情况进行请求排队、动态插入处理）
outputs = llm.generate(prompts, sampling_params)

# 输出结果
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs.text
""",
        swaps={
            "from fastdeploy import": "from tristream import",
            '"baidu/ERNIE-4.5-21B-A3B-Base-Paddle"': MODEL,
            "max_tokens=6400": "max_tokens=32",
        },
        checks="""\
assert len(outputs) == 1 and prompt == prompts[0] and generated_text == outputs[0].outputs[0].text, outputs
print(repr(generated_text))
""",
    ),
    # LMDeploy, https://lmdeploy.readthedocs.io/en/latest/llm/pipeline.html (docs/en/llm/pipeline.md),
    # "Apply streaming output"; the bundled model's 3 KV heads do not split over tp=2, so it runs on one rank.
    "lmdeploy-stream": Snippet(
        code="""\
from lmdeploy import pipeline, GenerationConfig, TurbomindEngineConfig

backend_config = TurbomindEngineConfig(tp=2)
gen_config = GenerationConfig(top_p=0.8,
                              top_k=40,
                              temperature=0.8,
                              max_new_tokens=1024)
pipe = pipeline('internlm/internlm2_5-7b-chat',
                backend_config=backend_config)
prompts = [[{
    'role': 'user',
    'content': 'Hi, pls intro yourself'
}], [{
    'role': 'user',
    'content': 'Shanghai is'
}]]
for item in pipe.stream_infer(prompts, gen_config=gen_config):
    print(item)
""",
        swaps={
            "from lmdeploy import": "from tristream import",
            "tp=2": "tp=1",
            "'internlm/internlm2_5-7b-chat'": MODEL,
            "max_new_tokens=1024": "max_new_tokens=24",
        },
        checks="""\
assert item.finish_reason is not None and pipe.llm.engine.config.tensor_parallel_size == 1
pipe.close()
""",
    ),
    # LMDeploy, https://lmdeploy.readthedocs.io/en/latest/llm/pipeline.html (docs/en/llm/pipeline.md),
    # "Calculate ppl".
    "lmdeploy-ppl": Snippet(
        code="""\
from transformers import AutoTokenizer
from lmdeploy import pipeline


model_repoid_or_path = 'internlm/internlm2_5-7b-chat'
pipe = pipeline(model_repoid_or_path)
tokenizer = AutoTokenizer.from_pretrained(model_repoid_or_path, trust_remote_code=True)
messages = [
   {"role": "user", "content": "Hello, how are you?"},
]
input_ids = tokenizer.apply_chat_template(messages)

# ppl is a list of float numbers
ppl = pipe.get_ppl(input_ids)
print(ppl)
""",
        swaps={"from lmdeploy import": "from tristream import", "'internlm/internlm2_5-7b-chat'": MODEL},
        checks="assert len(ppl) == 1 and 0 < ppl[0] < 20, ppl\npipe.close()\n",
    ),
    # LMDeploy, the same page, "Inference with LoRA" (the adapter path becomes a LoRA adapter of the bundled model).
    "lmdeploy-lora": Snippet(
        code="""\
from lmdeploy import pipeline, GenerationConfig, PytorchEngineConfig

backend_config = PytorchEngineConfig(session_len=2048,
                                     adapters=dict(lora_name_1='chenchi/lora-chatglm2-6b-guodegang'))
gen_config = GenerationConfig(top_p=0.8,
                              top_k=40,
                              temperature=0.8,
                              max_new_tokens=1024)
pipe = pipeline('THUDM/chatglm2-6b',
                backend_config=backend_config)
prompts = [[{
    'role': 'user',
    'content': '您猜怎么着'
}]]
response = pipe(prompts, gen_config=gen_config, adapter_name='lora_name_1')
print(response)
""",
        swaps={
            "from lmdeploy import": "from tristream import",
            "'THUDM/chatglm2-6b'": MODEL,
            "'chenchi/lora-chatglm2-6b-guodegang'": "ADAPTER",
            "max_new_tokens=1024": "max_new_tokens=32",
        },
        adapter=True,
        checks="""\
assert len(response) == 1 and response[0].text, response
assert pipe.llm.engine.lora_adapters == {"lora_name_1": ADAPTER}
assert (pipe.llm.engine.config.max_model_len, pipe.llm.engine.config.page_size) == (2048, 64)
pipe.close()
""",
    ),
    # ms-swift 2, https://swift.readthedocs.io/en/v2.6.1/LLM/LLM-inference.html (docs/source_en/LLM/LLM-inference.md),
    # "qwen-7b-chat"; seed_everything is transformers' set_seed, and ModelType.qwen_7b_chat the model's path.
    "ms-swift-inference": Snippet(
        code="""\
import os
os.environ['CUDA_VISIBLE_DEVICES'] = '0'

from swift.llm import (
    get_model_tokenizer, get_template, inference, ModelType, get_default_template_type,
)
from swift.utils import seed_everything

model_type = ModelType.qwen_7b_chat
template_type = get_default_template_type(model_type)
print(f'template_type: {template_type}')  # template_type: qwen


kwargs = {}
# kwargs['use_flash_attn'] = True  # use flash_attn

model, tokenizer = get_model_tokenizer(model_type, model_kwargs={'device_map': 'auto'}, **kwargs)
# modify max_new_tokens
model.generation_config.max_new_tokens = 128

template = get_template(template_type, tokenizer)
seed_everything(42)
query = 'Where is the capital of Zhejiang?'
response, history = inference(model, template, query)
print(f'query: {query}')
print(f'response: {response}')
query = 'What are some famous foods there?'
response, history = inference(model, template, query, history)
print(f'query: {query}')
print(f'response: {response}')
print(f'history: {history}')

# Streaming output chat template
inference(model, template, 'What was the first question?', history, verbose=True, stream=True)
""",
        swaps={
            "from swift.llm import (\n    get_model_tokenizer, get_template, inference, ModelType, get_default_template_type,\n)": (
                "from tristream.chat import get_model_tokenizer, get_template, inference, get_default_template_type"
            ),
            "from swift.utils import seed_everything": "from transformers import set_seed as seed_everything",
            "ModelType.qwen_7b_chat": MODEL,
            "max_new_tokens = 128": "max_new_tokens = 32",
        },
        checks="""\
assert [q for q, _ in history] == ['Where is the capital of Zhejiang?', 'What are some famous foods there?']
assert all(r for _, r in history) and model.generation_config.max_new_tokens == 32
model.shutdown()
""",
    ),
    # vLLM, https://docs.vllm.ai/en/v0.8.3/serving/multimodal_inputs.html (docs/source/serving/multimodal_inputs.md),
    # "Image Inputs"; PIL and the image files are left to the reader.
    "vllm-image-inputs": Snippet(
        code="""\
import PIL.Image  # left to the reader, as are the image files

from vllm import LLM

llm = LLM(model="llava-hf/llava-1.5-7b-hf")

# Refer to the HuggingFace repo for the correct format to use
prompt = "USER: <image>\\nWhat is the content of this image?\\nASSISTANT:"

# Load the image using PIL.Image
image = PIL.Image.open(...)

# Single prompt inference
outputs = llm.generate({
    "prompt": prompt,
    "multi_modal_data": {"image": image},
})

for o in outputs:
    generated_text = o.outputs[0].text
    print(generated_text)

# Batch inference
image_1 = PIL.Image.open(...)
image_2 = PIL.Image.open(...)
outputs = llm.generate(
    [
        {
            "prompt": "USER: <image>\\nWhat is the content of this image?\\nASSISTANT:",
            "multi_modal_data": {"image": image_1},
        },
        {
            "prompt": "USER: <image>\\nWhat's the color of this image?\\nASSISTANT:",
            "multi_modal_data": {"image": image_2},
        }
    ]
)

for o in outputs:
    generated_text = o.outputs[0].text
    print(generated_text)
""",
        swaps={
            "from vllm import": "from tristream import",
            '"llava-hf/llava-1.5-7b-hf"': VISION_MODEL,
            "image = PIL.Image.open(...)": "image = PIL.Image.open('image.png')",
            "image_1 = PIL.Image.open(...)": "image_1 = PIL.Image.open('image.png')",
            "image_2 = PIL.Image.open(...)": "image_2 = PIL.Image.open('image.png')",
        },
        vision=True,
        checks="""\
image_token = llm.get_tokenizer().convert_tokens_to_ids("<image>")
assert len(outputs) == 2 and [o.prompt_token_ids.count(image_token) for o in outputs] == [16, 16], outputs
assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outputs), outputs
""",
    ),
    # LMDeploy, https://lmdeploy.readthedocs.io/en/latest/multi_modal/vl_pipeline.html
    # (docs/en/multi_modal/vl_pipeline.md), "A 'Hello, world' example".
    "lmdeploy-vl-pipeline": Snippet(
        code="""\
from lmdeploy import pipeline
from lmdeploy.vl import load_image

pipe = pipeline('liuhaotian/llava-v1.6-vicuna-7b')

image = load_image('https://raw.githubusercontent.com/open-mmlab/mmdeploy/main/tests/data/tiger.jpeg')
response = pipe(('describe this image', image))
print(response)
""",
        swaps={
            "from lmdeploy import": "from tristream import",
            "from lmdeploy.vl import": "from tristream.lmdeploy import",
            "'liuhaotian/llava-v1.6-vicuna-7b'": VISION_MODEL,
            "'https://raw.githubusercontent.com/open-mmlab/mmdeploy/main/tests/data/tiger.jpeg'": "'image.png'",
        },
        vision=True,
        checks="""\
image_token = pipe.llm.get_tokenizer().convert_tokens_to_ids("<image>")
parts = [{"type": "image", "image": image}, {"type": "text", "text": "describe this image"}]
[chat] = pipe.llm.chat([{"role": "user", "content": parts}], use_tqdm=False)
assert chat.prompt_token_ids.count(image_token) == 16 and response.input_token_len == len(chat.prompt_token_ids)
assert response.finish_reason in ("stop", "length"), response
pipe.close()
""",
    ),
}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_dir: str) -> str:
    path = tmp_path_factory.mktemp("lora") / "adapter"
    make_lora_adapter(model_dir, path, 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return str(path)


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory) -> str:
    """A tiny random LLaVA-1.5 (16 tokens an image) whose answers end soon, as the snippets set no length: its
    context is 64 tokens and its generation_config.json asks for 16 new tokens."""
    path = tmp_path_factory.mktemp("llava")
    random_vision_model(path, "llava")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 64
    (path / "config.json").write_text(json.dumps(config))
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 16}))
    return str(path)


@pytest.mark.parametrize("name", list(SNIPPETS))
def test_peer_snippet_runs_as_written(name, tmp_path, request):
    snippet = SNIPPETS[name]
    code = snippet.code
    values = {MODEL: repr(resolve_model(None))}
    if snippet.adapter:
        values["ADAPTER"] = repr(request.getfixturevalue("adapter"))
    if snippet.vision:
        values[VISION_MODEL] = repr(request.getfixturevalue("vision_model"))
        random_image(0).save(tmp_path / "image.png")
    for old, new in snippet.swaps.items():
        assert code.count(old) == 1, f"{name}: {old!r} must appear once"
        code = code.replace(old, values.get(new, new))
    script = tmp_path / f"{name}.py"
    checks = snippet.checks.replace("ADAPTER", values.get("ADAPTER", "ADAPTER"))
    script.write_text(f"{code}\n{checks}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{name} printed nothing"
