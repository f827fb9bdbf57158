"""Vision-language models end to end on CPU in fp32: tiny random Qwen2.5-VL, Qwen2-VL and LLaVA models give
transformers' greedy tokens and logprobs on the same images, with the prefix cache on and off, with prefill
chunks smaller than an image, and the prefix cache tells images apart by their content."""

from __future__ import annotations

import io
import os

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText

from tests.conftest import random_image, random_vision_model  # pytest has imported the conftest under this name
from tristream import LLM, SamplingParams

STEPS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=STEPS, logprobs=1)


def hf_greedy(model, processor, ids: list[int], images: list, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens after prompt ``ids`` with ``images``, and the log-softmax of each step."""
    features = processor(images=images, return_tensors="pt")
    x = torch.tensor([ids])
    extra = {"pixel_values": features["pixel_values"]}
    if "image_grid_thw" in features:
        extra |= {
            "image_grid_thw": features["image_grid_thw"],
            "mm_token_type_ids": (x == model.config.image_token_id).int(),
        }
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **extra,
        )
    return out.sequences[0, len(ids) :].tolist(), [s[0].float().log_softmax(-1) for s in out.scores]


def chat(*parts: object) -> list[dict]:
    """One user message of images (PIL) and text, in order."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return [{"role": "user", "content": content}]


def assert_matches_hf(out, hf, images: list) -> None:
    """Our greedy tokens are transformers'; our logprobs are its within 1e-4."""
    model, processor = hf
    tokens, logprobs = hf_greedy(model, processor, out.prompt_token_ids, images, STEPS)
    ours = out.outputs[0]
    assert ours.token_ids == tokens
    for step, token in enumerate(tokens):
        assert ours.logprobs[step][token] == pytest.approx(float(logprobs[step][token]), abs=1e-4)


def media_files(llm: LLM) -> list[str]:
    return os.listdir(os.path.join(llm.engine._ipc_dir, "media"))


@pytest.fixture(scope="module")
def qwen_hf(qwen_vl_dir):
    model = AutoModelForImageTextToText.from_pretrained(qwen_vl_dir, dtype=torch.float32).eval()
    return model, AutoImageProcessor.from_pretrained(qwen_vl_dir)


@pytest.fixture(scope="module")
def chunked(qwen_vl_dir):
    """Qwen2.5-VL with the prefix cache on and prefill chunks of 16 tokens, fewer than an image has (48)."""
    with LLM(qwen_vl_dir, max_model_len=1024, max_num_batched_tokens=16, page_size=4, log_level="WARNING") as llm:
        yield llm


def test_qwen2_5_vl_matches_transformers_in_chunks(chunked, qwen_hf):
    one = chunked.chat(chat(random_image(0), "What is in this picture?"), GREEDY)[0]
    assert_matches_hf(one, qwen_hf, [random_image(0)])
    two = chunked.chat(chat(random_image(1), "Compare", random_image(2, 112, 112), "these."), GREEDY)[0]
    assert_matches_hf(two, qwen_hf, [random_image(1), random_image(2, 112, 112)])
    assert media_files(chunked) == []  # each request's pixel files are gone once it ends


def test_prefix_cache_keys_images_by_content(chunked):
    first = chat(random_image(3), "Describe it.")
    out = chunked.chat(first, GREEDY)[0]
    image_start = out.prompt_token_ids.index(chunked.engine.model_config.hf["image_token_id"])
    second = [*first, {"role": "assistant", "content": out.outputs[0].text}, *chat("And its colours?")]
    again = chunked.chat(second, GREEDY)[0]
    assert again.num_cached_tokens > image_start + 48  # the image's tokens came from the cache
    other = chunked.chat(chat(random_image(4), "Describe it."), GREEDY)[0]
    assert other.num_cached_tokens <= image_start  # the same placeholder ids, another image: no hit past it
    assert other.outputs[0].token_ids != out.outputs[0].token_ids


def test_bad_images_fail_alone(chunked):
    with pytest.raises(ValueError, match="image 0 cannot be read"):
        chunked.chat(chat(b"not an image", "What is this?"), GREEDY)
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 4"):
        chunked.chat(chat(*[random_image(i, 56, 56) for i in range(5)], "Count them."), GREEDY)
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        chunked.generate({"prompt": placeholder + "Hi", "multimodal_data": {"image": [random_image(5)] * 2}}, GREEDY)
    with pytest.raises(ValueError, match="must be a URL, a path, bytes or a PIL image"):
        chunked.chat(chat(42, "What is this?"), GREEDY)
    png = io.BytesIO()
    random_image(6).save(png, format="PNG")
    out = chunked.chat(chat(png.getvalue(), "What is this?"), GREEDY)[0]
    assert len(out.outputs[0].token_ids) == STEPS
    assert media_files(chunked) == []


def test_qwen2_5_vl_on_two_ranks_without_prefix_cache(qwen_vl_dir, qwen_hf):
    """The language model split over two CPU ranks, each running the vision encoder; prompts in one chunk."""
    with LLM(
        qwen_vl_dir, max_model_len=1024, enable_prefix_caching=False, tensor_parallel_size=2, log_level="WARNING"
    ) as llm:
        outs = llm.chat([chat(random_image(0), "What is in this picture?"), chat(random_image(7), "Hi.")], GREEDY)
    assert_matches_hf(outs[0], qwen_hf, [random_image(0)])
    assert_matches_hf(outs[1], qwen_hf, [random_image(7)])


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava"])
def test_family_matches_transformers(tmp_path, model_type):
    model = random_vision_model(tmp_path, model_type)
    hf = model, AutoImageProcessor.from_pretrained(tmp_path)
    images = [random_image(8), random_image(9, 56, 84)]
    with LLM(str(tmp_path), max_model_len=1024, log_level="WARNING") as llm:
        one, two = llm.chat([chat(images[0], "What is this?"), chat(images[0], "and", images[1], "?")], GREEDY)
    assert_matches_hf(one, hf, images[:1])
    assert_matches_hf(two, hf, images)


@pytest.mark.asyncio
async def test_text_only_model_refuses_images(engine):
    with pytest.raises(ValueError, match="text-only model: it takes no images"):
        async for _ in engine.chat(chat(random_image(0), "What is this?"), GREEDY):
            pass
    outs = [
        out async for out in engine.chat([{"role": "user", "content": "Still here?"}], SamplingParams(max_tokens=2))
    ]
    assert outs[-1].finished


def test_packed_attention_equals_attention_per_sequence():
    from tristream.gpu_proc.layers.vision import packed_attention

    gen = torch.Generator().manual_seed(0)
    for lengths in ([5, 64, 17, 64], [32, 32]):
        cu = torch.tensor([0, *lengths]).cumsum(0)
        q, k, v = (torch.randn(int(cu[-1]), 4, 16, generator=gen) for _ in range(3))
        want = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=0.25
                ).transpose(0, 1)
                for a, b in zip(cu[:-1], cu[1:])
            ]
        )
        torch.testing.assert_close(packed_attention(q, k, v, cu, 0.25), want, atol=1e-5, rtol=1e-5)
