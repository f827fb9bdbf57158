"""Images through every front door, on one tiny Qwen2.5-VL engine: vLLM's and FastDeploy's ``LLM.generate`` and
``LLM.chat``, ``AsyncEngine.chat``, ms-swift's ``inference``, LMDeploy's pipeline and ``load_image``, and the
``--limit-mm-per-prompt`` flag and LLaMA-Factory's YAML keys. Greedy, every form of one request gives the same
tokens."""

from __future__ import annotations

import base64
import logging

import pytest
from PIL import Image

from tests.conftest import random_image  # pytest has imported the conftest under this name
from tristream import LLM, AsyncEngine, EngineConfig, SamplingParams
from tristream.chat import get_template, inference, inference_stream
from tristream.cli import engine_args, parse_args
from tristream.lmdeploy import IMAGE_TOKEN, load_image
from tristream.outputs import RequestOutput, accumulate
from tristream.pipeline import Pipeline

GREEDY = SamplingParams(temperature=0, max_tokens=6)
QUESTION = "What is this?"
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
RENDERED = f"<|im_start|>user\n{PLACEHOLDER}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE = get_template(None)


@pytest.fixture(scope="module")
def llm(qwen_vl_dir):
    with LLM(qwen_vl_dir, max_model_len=1024, limit_mm_per_prompt={"image": 4}, log_level="WARNING") as llm:
        yield llm


@pytest.fixture(scope="module")
def pipe(llm):
    """LMDeploy's pipeline on the module's engine, which the ``llm`` fixture closes."""
    return Pipeline(llm)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    """``random_image(0)`` as a PNG file: the pixels of the PIL image."""
    path = tmp_path_factory.mktemp("images") / "noise.png"
    random_image(0).save(path)
    return str(path)


@pytest.fixture(scope="module")
def answer(llm) -> RequestOutput:
    """The greedy answer to ``QUESTION`` about ``random_image(0)``, through LLM.chat with a PIL image."""
    return llm.chat(user(image(random_image(0)), QUESTION), GREEDY, use_tqdm=False)[0]


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def user(*parts: object) -> list[dict]:
    """One user message of text (strings) and image parts (dicts), in order."""
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


def image(value: object) -> dict:
    return {"type": "image", "image": value}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ids(out: RequestOutput) -> tuple[list[int], list[int]]:
    return out.prompt_token_ids, out.outputs[0].token_ids


def test_llm_chat_and_generate_take_every_image_form(llm, answer, image_file):
    """vLLM's and FastDeploy's content parts and prompt dicts, with a PNG's data: URL, its path, or PIL."""
    assert answer.prompt == RENDERED and len(answer.outputs[0].token_ids) == GREEDY.max_tokens
    chats = [
        user(image_url(data_url(image_file)), QUESTION),
        user(image_url(image_file), QUESTION),
        user(image_url("file://" + image_file), QUESTION),
        user(image(image_file), QUESTION),
        user({"type": "image_pil", "image_pil": random_image(0)}, QUESTION),
    ]
    outs = llm.chat(chats, GREEDY, use_tqdm=False)
    prompts = [
        {"prompt": RENDERED, "multimodal_data": {"image": [random_image(0)]}},
        {"prompt": RENDERED, "multi_modal_data": {"image": random_image(0)}},
        {"prompt": RENDERED, "multi_modal_data": {"image": image_file}},
    ]
    outs += llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [ids(out) for out in outs] == [ids(answer)] * len(outs)

    first_token = SamplingParams(temperature=0, max_tokens=1, logprobs=0)
    same, other = llm.chat([user(image(random_image(i)), QUESTION) for i in (0, 1)], first_token, use_tqdm=False)
    assert other.prompt_token_ids == same.prompt_token_ids, "an image of the same size has the same placeholders"
    assert other.outputs[0].logprobs != same.outputs[0].logprobs, "another image, another next-token distribution"


def test_async_engine_chat_streams_an_answer_about_an_image(llm, answer, image_file):
    engine: AsyncEngine = llm.engine

    async def run() -> tuple[list[RequestOutput], tuple[str, list]]:
        deltas = [out async for out in engine.chat(user(image_url(data_url(image_file)), QUESTION), GREEDY)]
        return deltas, await inference(
            engine, TEMPLATE, "<image>" + QUESTION, images=[image_file], sampling_params=GREEDY
        )

    deltas, swift = llm._loop.run_until_complete(run())
    assert len(deltas) > 1 and [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    whole = None
    for delta in deltas:
        whole = accumulate(whole, delta)
    assert ids(whole) == ids(answer) and whole.finished
    assert swift == (answer.outputs[0].text, [("<image>" + QUESTION, answer.outputs[0].text)])


def test_ms_swift_inference_places_images_at_their_tags(llm, answer, image_file):
    text = answer.outputs[0].text
    pil = random_image(0)
    for query, images in [("<image>" + QUESTION, [image_file]), (QUESTION, [pil]), ("<image>" + QUESTION, (pil,))]:
        assert inference(llm, TEMPLATE, query, images=images, sampling_params=GREEDY) == (text, [(query, text)])
    steps = list(inference_stream(llm, TEMPLATE, QUESTION, images=[data_url(image_file)], sampling_params=GREEDY))
    assert steps[-1] == (text, [(QUESTION, text)])

    # A later turn: its <image> tag takes the second image; untagged images go before the first query.
    second = random_image(2, 112, 112)
    past = [(QUESTION, text)]
    reply, history = inference(llm, TEMPLATE, "And this<image>?", past, images=[pil, second], sampling_params=GREEDY)
    messages = [
        *user(image(pil), QUESTION),
        {"role": "assistant", "content": text},
        *user("And this", image(second), "?"),
    ]
    want = llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0].text
    assert (reply, history) == (want, [(QUESTION, text), ("And this<image>?", want)])
    past = [("<image>" + QUESTION, text)]
    reply, _ = inference(llm, TEMPLATE, "<image>And this?", past, images=[pil, second], sampling_params=GREEDY)
    want = llm.chat(messages[:2] + user(image(second), "And this?"), GREEDY, use_tqdm=False)[0].outputs[0].text
    assert reply == want
    with pytest.raises(ValueError, match="the queries have 2 <image> tags for 1 images"):
        inference(llm, TEMPLATE, "<image><image>Compare them.", images=[pil])
    with pytest.raises(TypeError, match="images must be a list"):
        inference(llm, TEMPLATE, QUESTION, images=image_file)


def test_lmdeploy_pipeline_takes_text_and_image_pairs(pipe, answer, image_file):
    want = answer.outputs[0]
    pil = random_image(0)
    for prompt in [
        (QUESTION, pil),
        (QUESTION, [load_image(image_file)]),
        (IMAGE_TOKEN + QUESTION, image_file),
        user(image_url(data_url(image_file)), QUESTION),
    ]:
        got = pipe(prompt, GREEDY)
        assert (got.token_ids, got.input_token_len) == (want.token_ids, len(answer.prompt_token_ids)), prompt

    two = [pil, random_image(3, 56, 84)]
    batch = pipe([(QUESTION, pil), ("Compare", two), QUESTION, (f"{IMAGE_TOKEN} or {IMAGE_TOKEN}?", two)], GREEDY)
    expected = pipe.llm.chat(
        [user(*map(image, two), "Compare"), user(QUESTION), user(image(two[0]), " or ", image(two[1]), "?")],
        GREEDY,
        use_tqdm=False,
    )
    assert [r.token_ids for r in batch] == [want.token_ids] + [out.outputs[0].token_ids for out in expected]
    with pytest.raises(ValueError, match="prompt 1: 'Compare <IMAGE_TOKEN>' has 1 <IMAGE_TOKEN> tags for 2 images"):
        pipe([QUESTION, (f"Compare {IMAGE_TOKEN}", two)], GREEDY)
    streamed = list(pipe.stream_infer([(QUESTION, pil)], GREEDY))
    assert [t for r in streamed for t in r.token_ids] == want.token_ids

    session = pipe.chat((QUESTION, pil), gen_config=GREEDY)
    assert session.response.token_ids == want.token_ids
    session = pipe.chat("And its colours?", session, gen_config=GREEDY)
    messages = [*user(image(pil), QUESTION), {"role": "assistant", "content": want.text}, *user("And its colours?")]
    assert session.response.token_ids == pipe.llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert [q for q, _ in session.history] == [(QUESTION, pil), "And its colours?"]
    with pytest.raises(ValueError, match="do_preprocess=False takes text, not \\(text, images\\)"):
        pipe((QUESTION, pil), GREEDY, do_preprocess=False)


def test_more_images_than_the_limit_fail_alone(llm, pipe):
    five = [random_image(i, 56, 56) for i in range(5)]
    match = "5 images, but limit_mm_per_prompt allows 4 per prompt"
    with pytest.raises(ValueError, match=match):
        llm.generate({"prompt": PLACEHOLDER * 5 + "Count them.", "multimodal_data": {"image": five}}, GREEDY)
    with pytest.raises(ValueError, match=match):
        llm.chat(user(*map(image, five), "Count them."), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=match):
        pipe(("Count them.", five), GREEDY)
    with pytest.raises(ValueError, match=match):
        inference(llm, TEMPLATE, "Count them.", images=five, sampling_params=GREEDY)
    [four] = llm.generate({"prompt": PLACEHOLDER * 4 + "Count them.", "multimodal_data": {"image": five[:4]}}, GREEDY)
    assert four.finished and len(four.outputs[0].token_ids) == GREEDY.max_tokens


def test_load_image_reads_a_path_a_data_url_or_a_pil_image(image_file, tmp_path):
    pixels = random_image(0).tobytes()
    for source in (image_file, data_url(image_file), random_image(0)):
        loaded = load_image(source)
        assert (loaded.mode, loaded.size, loaded.tobytes()) == ("RGB", (224, 168), pixels)
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 4), 100).save(gray)
    assert load_image(str(gray)).getpixel((0, 0)) == (100, 100, 100)
    with pytest.raises(ValueError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("value", ["image=4", '{"image": 4}', " image = 4 "])
def test_limit_mm_per_prompt_flag_takes_vllms_forms(value):
    args = parse_args(["serve", "--limit-mm-per-prompt", value, "--lora-modules", "a=/x", "b=/y"])
    assert (args.limit_mm_per_prompt, args.lora_adapters) == ({"image": 4}, {"a": "/x", "b": "/y"})
    assert EngineConfig(**engine_args(args)).image_limit == 4


@pytest.mark.parametrize(
    "value, words",
    [
        ("image=four", "the image limit must be a whole number >= 0, got 'four'"),
        ('{"image": -1}', "the image limit must be a whole number >= 0, got -1"),
        ('{"image": 2.5}', "the image limit must be a whole number >= 0, got 2.5"),
        ("video=2", "'video' cannot be limited: the media are image"),
        ("four", "'four' is not image=N or a JSON object"),
        ("{image: 4}", "'{image: 4}' is not valid JSON"),
        ("[4]", "'[4]' is not image=N or a JSON object"),
    ],
)
def test_a_bad_limit_mm_per_prompt_flag_says_why(capsys, value, words):
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", "--limit-mm-per-prompt", value])
    assert info.value.code == 2 and f"argument --limit-mm-per-prompt: {words}" in capsys.readouterr().err


def test_llama_factory_vision_keys_need_no_flags(tmp_path, caplog, capsys):
    path = tmp_path / "vl.yaml"
    for keys, limit in [
        ("template: qwen2_vl\nvisual_inputs: true\nlimit_mm_per_prompt: {image: 2}\n", {"image": 2}),
        ("template: llava\nvisual_inputs: false\nlimit_mm_per_prompt: image=3\n", {"image": 3}),
    ]:
        path.write_text("model_name_or_path: /models/vl\n" + keys)
        with caplog.at_level(logging.INFO, logger="tristream"):
            args = parse_args(["chat", str(path)])
        assert (args.model, args.chat_template, args.limit_mm_per_prompt) == ("/models/vl", None, limit)
        assert caplog.messages == []
    path.write_text("template: chatml\nlimit_mm_per_prompt: {video: 1}\n")
    with pytest.raises(SystemExit):
        parse_args(["serve", str(path)])
    assert f"config file {path}: limit_mm_per_prompt: 'video' cannot be limited" in capsys.readouterr().err
