"""A small random Qwen2.5-VL in bf16 on the GPU: tristream's prompt logits with an image (vision encoder, M-RoPE,
spliced embeddings, chunked prefill across the image) against transformers' on the same weights and pixels.

bf16 has its own error, so both are measured against transformers in fp32; tristream must stay within a small
multiple of transformers' own bf16 error.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMAGE_TOKEN, VISION_START, VISION_END = 1000, 1001, 1002
PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 200704,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    text = dict(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
    )
    vision = dict(
        depth=4,
        hidden_size=256,
        num_heads=4,
        intermediate_size=512,
        out_hidden_size=512,
        fullatt_block_indexes=[1, 3],
        window_size=112,
    )
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02)
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return str(folder)


def prompt_and_image(model_dir, media_dir):
    from PIL import Image

    from tristream.model_config import ModelConfig
    from tristream.tokenizer_proc.images import PromptImages

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 448, 3), dtype=np.uint8))
    ids = list(range(10, 30)) + [VISION_START, IMAGE_TOKEN, VISION_END] + list(range(40, 60))
    images = PromptImages(model_dir, ModelConfig.load(model_dir), str(media_dir), 4)
    return *images.expand(ids, [image]), image


def ours(model_dir, ids, inputs, chunk: int) -> torch.Tensor:
    """The last prompt position's logits, the prompt prefilled in chunks of ``chunk`` tokens."""
    from tristream.config import EngineConfig
    from tristream.gpu_proc.runner import ModelRunner
    from tristream.protocol import BatchPlan, NewSequence
    from tristream.sampling_params import SamplingParams

    config = EngineConfig(model=model_dir, dtype="bfloat16", device="cuda", max_model_len=2048, kv_cache_tokens=4096)
    runner = ModelRunner(config)
    captured = []
    forward = runner.model.forward
    runner.model.forward = lambda batch, kv: captured.append(forward(batch, kv)) or captured[-1]
    new = NewSequence(0, ids, 0, 0, SamplingParams(temperature=0, seed=0), images=inputs)
    pages = list(range(1, 1 + 2048 // config.page_size))
    done, step = 0, 0
    while done < len(ids):
        n = min(chunk, len(ids) - done)
        plan = BatchPlan(step, slots=[0], num_tokens=[n], sample=[done + n == len(ids)])
        if step == 0:
            plan.new, plan.pages = [new], [(0, pages)]
        runner.step(plan)
        done, step = done + n, step + 1
    return captured[-1][0].float()


def test_prompt_logits_with_an_image_match_transformers(model_dir, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    ids, inputs, image = prompt_and_image(model_dir, tmp_path)
    whole, chunked = ours(model_dir, ids, inputs, 4096), ours(model_dir, ids, inputs, 64)
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    features = AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt")
    x = torch.tensor([ids], device="cuda")
    extra = {"pixel_values": features["pixel_values"].cuda(), "image_grid_thw": features["image_grid_thw"].cuda()}
    if "mm_token_type_ids" in inspect.signature(hf.model.forward).parameters:
        extra["mm_token_type_ids"] = (x == IMAGE_TOKEN).int()
    with torch.no_grad():
        ref32 = hf(x, **extra).logits[0, -1].float()
        hf.to(torch.bfloat16)
        extra["pixel_values"] = extra["pixel_values"].to(torch.bfloat16)
        ref16 = hf(x, **extra).logits[0, -1].float()
    bound = max(2 * rel(ref16, ref32), 5e-3)
    print(
        f"rel. error vs fp32: ours {rel(whole, ref32):.2e}, chunked {rel(chunked, ref32):.2e}, hf bf16 {rel(ref16, ref32):.2e}"
    )
    assert rel(whole, ref32) < bound
    assert rel(chunked, ref32) < bound
