"""The web chat page at ``/`` in headless Chromium against the live server.

Streaming, multi-turn history, Stop, inline errors, the API key, markdown, copy, regenerate, edit, sampling
controls, the LoRA adapter selector, a conversation that survives a reload, and no request to any other origin.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from urllib.parse import urlsplit

import pytest
from playwright.async_api import async_playwright, expect

from tests.conftest import (
    make_lora_adapter,
    start_server,
    stop_server,
)  # pytest has imported the conftest under this name

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
    """One page of a fresh Chromium, with every request it makes, every chat completion body it posts and every
    message it logs to the console."""

    def __init__(self, page, requests: list, posts: list, console: list) -> None:
        self.page = page
        self.requests = requests
        self.posts = posts
        self.console = console

    def assistant(self, i: int):
        return self.page.locator("#messages .msg.assistant").nth(i)

    async def ask(self, text: str) -> None:
        await self.page.fill("#prompt", text)
        await self.page.press("#prompt", "Enter")


@contextlib.asynccontextmanager
async def open_page(url: str):
    """The chat page at ``url`` in a fresh Chromium that may use the clipboard."""
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: the test setup installs Debian's chromium package"
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await chromium.new_context(
                viewport={"width": 1280, "height": 800}, permissions=["clipboard-read", "clipboard-write"]
            )
            page = await context.new_page()
            requests: list = []
            posts: list = []

            def on_request(request) -> None:
                requests.append(request.url)
                if request.method == "POST" and urlsplit(request.url).path == "/v1/chat/completions":
                    posts.append({"body": request.post_data_json, "headers": request.headers})

            context.on("request", on_request)
            console: list = []
            page.on("console", lambda message: console.append(message.text))
            await page.goto(url + "/")
            yield Browser(page, requests, posts, console)
            await context.close()
        finally:
            await chromium.close()


@pytest.fixture
async def browser(live_server):
    async with open_page(live_server.url) as opened:
        yield opened


def assert_same_origin(urls: list[str], origin: str) -> None:
    assert {urlsplit(u).path for u in urls} >= {"/", "/v1/models", "/v1/chat/completions"}
    for url in urls:
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == origin, f"the page requested another origin: {url}"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    return struct.unpack(">II", data[16:24])


def event_stream(pieces: list[str]) -> str:
    """A streamed chat completion of ``pieces``, as the server sends one."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


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


MARKDOWN = [
    "Here is **bold** text and `inline code`.\n\n",
    "```python\ndef add(a, b):\n    return a + b\n```\n\n",
    '<img src="x" onerror="window.__xss = 1"><script>window.__xss = 2</script>\n\n',
    "[bad](javascript:window.__xss=3) and [docs](https://example.com/docs)\n",
]


async def test_markdown_is_rendered_highlighted_and_sanitised(browser: Browser, live_server, tmp_path):
    page = browser.page

    async def canned(route) -> None:
        await route.fulfill(status=200, content_type="text/event-stream", body=event_stream(MARKDOWN))

    await page.route("**/v1/chat/completions", canned)
    await browser.ask("Show me some markdown.")
    answer = browser.assistant(0)
    await expect(answer).to_have_attribute("data-state", "done")
    markdown = answer.locator(".markdown")
    await expect(markdown.locator("strong")).to_have_text("bold")
    await expect(markdown.locator("p code")).to_have_text("inline code")
    code = markdown.locator("pre code.hljs.language-python")
    await expect(code).to_contain_text("def add(a, b):\n    return a + b")
    await expect(code.locator(".hljs-keyword").first).to_have_text("def")
    assert "monospace" in await code.evaluate("e => getComputedStyle(e).fontFamily")

    await expect(markdown.locator("script, [onerror], a[href^='javascript']")).to_have_count(0)
    link = markdown.locator("a[href='https://example.com/docs']")
    await expect(link).to_have_attribute("target", "_blank")
    await expect(link).to_have_attribute("rel", "noopener noreferrer")
    await page.wait_for_timeout(500)
    assert await page.evaluate("window.__xss") is None

    # The text as the model wrote it: under Raw, and what Copy puts on the clipboard.
    raw = "".join(MARKDOWN)
    content = answer.locator(".content")
    assert await content.text_content() == raw
    await expect(content).to_be_hidden()
    await answer.locator(".tool.raw").click()
    await expect(content).to_be_visible()
    await expect(markdown).to_be_hidden()
    await answer.locator(".tool.raw").click()
    await expect(markdown).to_be_visible()
    await answer.locator(".tool.copy").click()
    await expect(answer.locator(".tool.copy")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == raw

    shot = tmp_path / "markdown.png"
    await page.screenshot(path=shot, full_page=True)
    assert png_size(shot) >= (1280, 800)
    assert_same_origin(browser.requests, live_server.url.rstrip("/"))
    # The page's own script, styles and libraries load under its policy, which refuses inline code and images
    # from anywhere: the policy blocks only what the answer holds (its <img src="x">, and its event handler,
    # which the sanitiser drops, while it is parsed).
    assert {urlsplit(u).path for u in browser.requests} >= {"/static/chat.js", "/static/vendor/purify.min.js"}
    blocked = [m for m in browser.console if "Content Security Policy" in m]
    answers = ("Executing inline event handler", f"Loading the image '{live_server.url.rstrip('/')}/x'")
    assert blocked and [m for m in blocked if not m.startswith(answers)] == [], blocked


async def test_regenerate_edit_sampling_controls_and_reload(browser: Browser):
    page = browser.page
    for field, value in [("#temperature", "0"), ("#max-tokens", "8"), ("#top-p", "0.9"), ("#top-k", "40")]:
        await page.fill(field, value)
    await browser.ask("Name a color.")
    await expect(browser.assistant(0)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    answer = await browser.assistant(0).locator(".content").text_content()
    body = browser.posts[0]["body"]
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0, 0.9, 40, 8)

    # Regenerate asks the same conversation again, and the new answer takes the old one's place.
    await browser.assistant(0).locator(".tool.regen").click()
    await expect(browser.assistant(0)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    await expect(page.locator("#messages .msg")).to_have_count(2)
    assert len(browser.posts) == 2 and browser.posts[1]["body"]["messages"] == body["messages"]
    assert await browser.assistant(0).locator(".content").text_content() == answer  # greedy

    # Editing the last question drops its answer and asks the edited one.
    user = page.locator("#messages .msg.user")
    await user.locator(".tool.edit").click()
    box = user.locator(".edit-box")
    await expect(box).to_have_value("Name a color.")
    await box.fill("Name a fruit.")
    await box.press("Enter")
    await expect(browser.assistant(0)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    await expect(user.locator(".content")).to_have_text("Name a fruit.")
    await expect(page.locator("#messages .msg")).to_have_count(2)
    assert browser.posts[2]["body"]["messages"] == [{"role": "user", "content": "Name a fruit."}]
    edited = await browser.assistant(0).locator(".content").text_content()

    # The conversation and the settings survive a reload, and the conversation goes on from there.
    await page.reload()
    await expect(page.locator("#messages .msg.user .content")).to_have_text(["Name a fruit."])
    restored = browser.assistant(0)
    await expect(restored).to_have_attribute("data-state", "done")
    assert await restored.locator(".content").text_content() == edited
    assert "tok/s" in await restored.locator(".meta").text_content()
    await expect(page.locator("#top-p")).to_have_value("0.9")
    await expect(page.locator("#top-k")).to_have_value("40")
    await browser.ask("And another?")
    await expect(browser.assistant(1)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    assert browser.posts[-1]["body"]["messages"] == [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": edited},
        {"role": "user", "content": "And another?"},
    ]
    # Edit and Regenerate are offered on the last exchange only.
    await expect(browser.assistant(0).locator(".tool.regen")).to_be_hidden()
    await expect(user.first.locator(".tool.edit")).to_be_hidden()
    await expect(browser.assistant(1).locator(".tool.regen")).to_be_visible()
    await expect(user.last.locator(".tool.edit")).to_be_visible()

    await page.click("#new-chat")
    await page.reload()
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator("#messages .msg")).to_have_count(0)


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, model_dir):
    adapter = tmp_path_factory.mktemp("adapter") / "qv"
    make_lora_adapter(model_dir, adapter, 0, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    server = start_server("--lora-modules", f"qv={adapter}", "--max-model-len", "1024", "--log-level", "WARNING")
    yield server
    stop_server(server)


async def test_model_selector_lists_lora_adapters(lora_server):
    async with open_page(lora_server.url) as browser:
        page = browser.page
        select = page.locator("#model-select")
        await expect(select).to_be_visible()
        await expect(page.locator("#model")).to_be_hidden()
        await expect(select.locator("option")).to_have_text([lora_server.model, "qv (LoRA)"])
        await expect(select).to_have_value(lora_server.model)
        await select.select_option("qv")
        await page.fill("#temperature", "0")
        await page.fill("#max-tokens", "4")
        await browser.ask("Hi")
        await expect(browser.assistant(0)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
        assert browser.posts[-1]["body"]["model"] == "qv"
        await page.reload()
        await expect(select).to_have_value("qv")
