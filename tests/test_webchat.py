"""The web chat page at ``/`` in headless Chromium against the live server.

Streaming, multi-turn history, Stop, inline errors, the API key, and no request to any other origin.
"""

from __future__ import annotations

import json
import os
import struct
import time
from urllib.parse import urlsplit

import pytest
from playwright.async_api import async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_TIMEOUT_MS = 120_000
# A loaded CI machine can take more than the default 5 s for a page update.
expect.set_options(timeout=30_000)

# Records (text length, state) of the last assistant message at every DOM change under #messages.
OBSERVE_JS = """() => {
  window.__updates = [];
  new MutationObserver(() => {
    const msgs = document.querySelectorAll('#messages .msg.assistant');
    const last = msgs[msgs.length - 1];
    if (last) window.__updates.push([last.querySelector('.content').textContent.length, last.dataset.state]);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


class Browser:
    """One page of a fresh Chromium, with every request it makes and every chat completion body it posts."""

    def __init__(self, page, requests: list, posts: list) -> None:
        self.page = page
        self.requests = requests
        self.posts = posts

    def assistant(self, i: int):
        return self.page.locator("#messages .msg.assistant").nth(i)

    async def ask(self, text: str) -> None:
        await self.page.fill("#prompt", text)
        await self.page.press("#prompt", "Enter")


@pytest.fixture
async def browser(live_server):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: the test setup installs Debian's chromium package"
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await chromium.new_context(viewport={"width": 1280, "height": 800})
            page = await context.new_page()
            requests: list = []
            posts: list = []

            def on_request(request) -> None:
                requests.append(request.url)
                if request.method == "POST" and urlsplit(request.url).path == "/v1/chat/completions":
                    posts.append({"body": request.post_data_json, "headers": request.headers})

            context.on("request", on_request)
            await page.goto(live_server.url + "/")
            yield Browser(page, requests, posts)
            await context.close()
        finally:
            await chromium.close()


def assert_same_origin(urls: list[str], origin: str) -> None:
    assert {urlsplit(u).path for u in urls} >= {"/", "/v1/models", "/v1/chat/completions"}
    for url in urls:
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == origin, f"the page requested another origin: {url}"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    return struct.unpack(">II", data[16:24])


async def test_streams_multi_turn_chat(browser: Browser, live_server, tmp_path):
    page = browser.page
    models = await (await page.request.get(live_server.url + "/v1/models")).json()
    model = models["data"][0]["id"]
    await expect(page.locator("#model")).to_have_text(model)

    await page.fill("#temperature", "0")
    await page.fill("#max-tokens", "24")
    await page.evaluate(OBSERVE_JS)

    await browser.ask("Name three colors of the rainbow.")
    first = browser.assistant(0)
    await expect(first).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    answer = await first.locator(".content").text_content()
    assert answer.strip(), "the first answer is empty"

    updates = await page.evaluate("window.__updates")
    growing = sorted({n for n, state in updates if state == "streaming" and n > 0})
    assert len(growing) >= 2, f"the answer did not arrive in pieces: {updates}"
    assert growing[-1] <= len(answer)

    tokens = int(await first.get_attribute("data-tokens"))
    assert 0 < tokens <= 24
    assert "tok/s" in await first.locator(".meta").text_content()

    assert len(browser.posts) == 1
    body = browser.posts[0]["body"]
    assert body["model"] == model
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["messages"] == [{"role": "user", "content": "Name three colors of the rainbow."}]

    await page.fill("#prompt", "And one more?")
    await page.click("#send")
    second = browser.assistant(1)
    await expect(second).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    assert len(browser.posts) == 2
    assert browser.posts[1]["body"]["messages"] == [
        {"role": "user", "content": "Name three colors of the rainbow."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And one more?"},
    ]
    await expect(page.locator("#messages .msg.user")).to_have_count(2)
    await expect(page.locator("#send")).to_be_visible()
    await expect(page.locator("#stop")).to_be_hidden()

    shot = tmp_path / "webchat.png"
    await page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 10_000
    assert png_size(shot) >= (1280, 800)

    await page.click("#new-chat")
    await expect(page.locator("#messages .msg")).to_have_count(0)
    await expect(page.locator("#empty")).to_be_visible()
    assert_same_origin(browser.requests, live_server.url.rstrip("/"))


async def test_stop_keeps_partial_answer(browser: Browser, live_server):
    page = browser.page
    await page.fill("#temperature", "0")
    await page.fill("#max-tokens", "400")
    await browser.ask("Write a long story about a dragon who learns to bake bread. Describe every step in detail.")

    answer = browser.assistant(0)
    content = answer.locator(".content")
    await expect(content).not_to_have_text("", timeout=ANSWER_TIMEOUT_MS)
    await expect(page.locator("#send")).to_be_hidden()
    clicked = time.monotonic()
    await page.click("#stop")
    await expect(answer).to_have_attribute("data-state", "stopped", timeout=10_000)
    assert time.monotonic() - clicked < 10

    partial = await content.text_content()
    tokens = int(await answer.get_attribute("data-tokens"))
    assert partial and 0 < tokens < 200, f"stopped after {tokens} tokens"
    assert "stopped" in await answer.locator(".meta").text_content()
    await page.wait_for_timeout(1000)
    assert await content.text_content() == partial, "text kept arriving after Stop"
    await expect(page.locator("#send")).to_be_visible()
    await expect(page.locator("#stop")).to_be_hidden()

    # The partial answer stays in the conversation.
    await page.fill("#max-tokens", "8")
    await browser.ask("Go on.")
    await expect(browser.assistant(1)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    messages = browser.posts[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == partial
    assert_same_origin(browser.requests, live_server.url.rstrip("/"))


async def test_errors_show_inline_and_api_key_is_sent(browser: Browser):
    page = browser.page
    error = {"error": {"message": "Invalid API key.", "type": "authentication_error", "param": None, "code": None}}

    async def unauthorized(route) -> None:
        await route.fulfill(status=401, content_type="application/json", body=json.dumps(error))

    await page.route("**/v1/chat/completions", unauthorized)
    await page.fill("#api-key", "sk-test-key")
    await browser.ask("Hello <b>there</b>")

    answer = browser.assistant(0)
    await expect(answer).to_have_attribute("data-state", "error")
    await expect(answer.locator(".error")).to_contain_text("401 Invalid API key.")
    await expect(answer.locator(".error")).to_contain_text("API key")
    assert browser.posts[-1]["headers"]["authorization"] == "Bearer sk-test-key"
    assert await page.evaluate("localStorage.getItem('tristream.api-key')") == "sk-test-key"
    # The failed message goes back into the box, shown as text, and is left out of the next request.
    await expect(page.locator("#prompt")).to_have_value("Hello <b>there</b>")
    await expect(page.locator("#messages .msg.user .content")).to_have_text("Hello <b>there</b>")
    await expect(page.locator("#messages b")).to_have_count(0)

    await page.unroute("**/v1/chat/completions")
    await page.fill("#api-key", "")
    await page.fill("#max-tokens", "4")
    await browser.ask("Hi")
    await expect(browser.assistant(1)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    assert browser.posts[-1]["body"]["messages"] == [{"role": "user", "content": "Hi"}]
    assert "authorization" not in browser.posts[-1]["headers"]
