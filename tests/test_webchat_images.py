"""Images in the web chat page, in headless Chromium: attached with the image button, shown in the conversation,
sent as data: URLs to a vision-language model, and a text-only model's refusal shown inline."""

from __future__ import annotations

import base64

import httpx
import pytest
from playwright.async_api import expect

from tests.conftest import random_image  # pytest has imported the conftest under this name
from tests.test_webchat import ANSWER_TIMEOUT_MS, OBSERVE_JS, assert_same_origin, open_page, png_size

QUESTION = "What is in this image?"


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "noise.png"
    random_image(0).save(path)
    return path


def image_part(path) -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()},
    }


async def test_an_attached_image_is_shown_sent_and_answered(vl_server, image_file, tmp_path):
    async with open_page(vl_server.url) as browser:
        page = browser.page
        await page.fill("#temperature", "0")
        # Enough tokens that the answer arrives in pieces even when a busy machine merges some steps' deltas.
        await page.fill("#max-tokens", "64")
        await page.set_input_files("#image-input", image_file)
        pending = page.locator("#attachments .attachment img")
        await expect(pending).to_have_count(1)
        await expect(page.locator("#send")).to_be_enabled()
        await page.evaluate(OBSERVE_JS)
        await browser.ask(QUESTION)

        answer = browser.assistant(0)
        await expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
        text = await answer.locator(".content").text_content()
        updates = await page.evaluate("window.__updates")
        assert len({n for n, state in updates if state == "streaming" and n > 0}) >= 2, updates
        await expect(page.locator("#attachments")).to_be_hidden()

        thumb = page.locator("#messages .msg.user img.thumb")
        await expect(thumb).to_have_count(1)
        await expect(thumb).to_be_visible()
        assert await thumb.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]") == [True, 224, 168]
        await expect(page.locator("#messages .msg.user .content")).to_have_text(QUESTION)

        sent = [{"role": "user", "content": [image_part(image_file), {"type": "text", "text": QUESTION}]}]
        body = browser.posts[0]["body"]
        assert body["messages"] == sent
        # The page shows what the API answers to the same request.
        direct = httpx.post(
            vl_server.url + "/v1/chat/completions",
            json={"messages": sent, "temperature": 0, "max_tokens": 64},
            timeout=120,
        ).json()
        assert text == direct["choices"][0]["message"]["content"] and text

        # The image stays in the conversation: in the next request and after a reload.
        await browser.ask("Describe it in one word.")
        await expect(browser.assistant(1)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
        assert browser.posts[1]["body"]["messages"][:2] == [*sent, {"role": "assistant", "content": text}]
        await page.reload()
        await expect(page.locator("#messages .msg.user img.thumb")).to_have_count(1)

        shot = tmp_path / "webchat-image.png"
        await page.screenshot(path=shot, full_page=True)
        assert shot.stat().st_size > 10_000 and png_size(shot) >= (1280, 800)
        assert_same_origin(browser.requests, vl_server.url.rstrip("/"))


async def test_a_text_only_model_refusal_shows_inline_and_gives_the_image_back(live_server, image_file):
    async with open_page(live_server.url) as browser:
        page = browser.page
        await page.fill("#max-tokens", "4")
        await page.set_input_files("#image-input", image_file)
        await browser.ask(QUESTION)

        answer = browser.assistant(0)
        await expect(answer).to_have_attribute("data-state", "error", timeout=ANSWER_TIMEOUT_MS)
        await expect(answer.locator(".error")).to_contain_text("400")
        await expect(answer.locator(".error")).to_contain_text("text-only model")
        await expect(page.locator("#messages .msg.user.failed img.thumb")).to_have_count(1)
        # The question and its image go back into the composer; without the image, the question is answered.
        await expect(page.locator("#prompt")).to_have_value(QUESTION)
        await expect(page.locator("#attachments .attachment img")).to_have_count(1)
        await page.click("#attachments .remove")
        await expect(page.locator("#attachments")).to_be_hidden()
        await page.click("#send")
        await expect(browser.assistant(1)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
        assert browser.posts[-1]["body"]["messages"] == [{"role": "user", "content": QUESTION}]
