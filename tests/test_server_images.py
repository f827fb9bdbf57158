"""Images in ``/v1/chat/completions``: data:, http(s) and local file URLs, and a 400 for each bad image.

One server on a tiny Qwen2.5-VL model serves the module, with a small image size cap, a short fetch timeout and
one folder of local images it may read; a tiny HTTP server on 127.0.0.1 serves the images to fetch.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from tests.conftest import (
    VL_FETCH_TIMEOUT,
    VL_MAX_IMAGE_BYTES,
    random_image,
)  # pytest has imported the conftest under this name

MAX_IMAGE_BYTES, FETCH_TIMEOUT = VL_MAX_IMAGE_BYTES, VL_FETCH_TIMEOUT
GREEDY = dict(temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)


def png(seed: int, width: int = 224, height: int = 168) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


def asking(*urls: str, text: str = "What is in this image?") -> list[dict]:
    """One user message: the images at ``urls`` (with OpenAI's ``detail``, which changes nothing), then ``text``."""
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": "low"}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


IMAGE = png(0)
OTHER = png(1)
# Random pixels barely compress: 448x336 of them make a PNG of about 450 KB.
BIG = png(2, 448, 336)


class ImageHandler(BaseHTTPRequestHandler):
    """``/image.png`` and ``/big.png``; ``/slow.png`` answers nothing for twice the server's fetch timeout; 404
    for anything else."""

    def do_GET(self) -> None:
        if self.path == "/slow.png":
            time.sleep(2 * FETCH_TIMEOUT)
            return
        body = {"/image.png": IMAGE, "/big.png": BIG}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def images_url():
    """The address of a tiny HTTP server of images."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def media_dir(vl_media_dir):
    """The folder the server may read images from, with ``image.png`` in it."""
    (vl_media_dir / "image.png").write_bytes(IMAGE)
    return vl_media_dir


@dataclass
class Reply:
    """A reply's text, tokens and their logprobs, and usage."""

    text: str
    tokens: list[str]
    logprobs: list[float]
    usage: object

    def assert_same(self, other: Reply) -> None:
        """The same reply to the same prompt (the logprobs up to float rounding: a prefix cache hit sums in
        another order)."""
        assert (other.text, other.tokens, other.usage.prompt_tokens) == (
            self.text,
            self.tokens,
            self.usage.prompt_tokens,
        )
        assert other.logprobs == pytest.approx(self.logprobs, abs=1e-4)


class Api:
    """The official openai client on a live server's model."""

    def __init__(self, server) -> None:
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.model = server.model

    def answer(self, messages: list[dict], **fields) -> Reply:
        """The greedy reply to ``messages``."""
        r = self.client.chat.completions.create(model=self.model, messages=messages, **{**GREEDY, **fields})
        steps = r.choices[0].logprobs.content
        return Reply(r.choices[0].message.content, [t.token for t in steps], [t.logprob for t in steps], r.usage)

    def refusal(self, messages: list[dict], **fields) -> str:
        """The message of the 400 in OpenAI's format that ``messages`` get."""
        with pytest.raises(openai.BadRequestError) as info:
            self.client.chat.completions.create(model=self.model, messages=messages, **{**GREEDY, **fields})
        error = info.value.response.json()["error"]
        assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
        return error["message"]


@pytest.fixture(scope="module")
def api(vl_server, media_dir) -> Api:
    return Api(vl_server)


def test_a_data_url_image_answers_as_the_same_image_over_http(api, images_url):
    reply = api.answer(asking(data_url(IMAGE)))
    assert reply.text and len(reply.tokens) == 8
    reply.assert_same(api.answer(asking(images_url + "/image.png")))
    # The image is in the prompt, as 48 tokens (12x16 patches of 14 pixels, merged 2x2) between its start and end
    # tokens, and it moves the logits.
    text_only = api.answer([{"role": "user", "content": "What is in this image?"}])
    assert reply.usage.prompt_tokens == text_only.usage.prompt_tokens + 2 + 48
    other = api.answer(asking(data_url(OTHER)))
    assert other.logprobs[0] != pytest.approx(reply.logprobs[0], abs=1e-3)
    assert text_only.logprobs[0] != pytest.approx(reply.logprobs[0], abs=1e-3)


def test_local_files_under_the_allowed_folder_only(api, media_dir, tmp_path):
    expected = api.answer(asking(data_url(IMAGE)))
    path = media_dir / "image.png"
    expected.assert_same(api.answer(asking(str(path))))
    expected.assert_same(api.answer(asking(f"file://{path}")))
    outside = tmp_path / "outside.png"
    outside.write_bytes(IMAGE)
    (media_dir / "link.png").symlink_to(outside)
    for name in (str(outside), f"file://{outside}", str(media_dir / "link.png"), str(media_dir / "../x.png")):
        assert "outside the allowed local media path" in api.refusal(asking(name))
    assert "no such file" in api.refusal(asking(str(media_dir / "missing.png")))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/image.png"


# Each bad request: its images (``{http}`` is the image server's address) and words of its error message.
BAD_IMAGES = {
    "undecodable base64": (["data:image/png;base64,@@not*base64@@"], ["base64 payload is not valid"]),
    "not an image": ([data_url(b"plain text, not a picture")], ["image 0 cannot be read"]),
    "over the size cap": ([data_url(BIG)], [f"larger than {MAX_IMAGE_BYTES} bytes"]),
    "over the size cap over http": (["{http}/big.png"], [f"larger than {MAX_IMAGE_BYTES} bytes"]),
    "http 404": (["{http}/missing.png"], ["fetching", "missing.png failed", "Not Found"]),
    "closed port": ([closed_port_url()], ["fetching", "failed", "refused"]),
    "five images": ([data_url(IMAGE)] * 5, ["5 images", "allows 4"]),
    "no URL": ([None], ["only text parts", "without 'image_url'"]),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_each_bad_image_is_a_400_and_the_server_goes_on(api, images_url, case, stream):
    urls, words = BAD_IMAGES[case]
    parts = [
        {"type": "image_url", **({"image_url": {"url": url.format(http=images_url)}} if url else {})} for url in urls
    ]
    message = api.refusal([{"role": "user", "content": parts}], stream=stream)
    assert all(word in message for word in words), message
    assert api.answer(asking(data_url(IMAGE)), max_tokens=2).text


def test_a_fetch_that_times_out_is_a_400_and_holds_up_no_other_request(api, images_url):
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        slow = pool.submit(api.refusal, asking(images_url + "/slow.png"))
        assert api.answer(asking(data_url(IMAGE)), max_tokens=2).text
        assert not slow.done(), f"an answer took {time.monotonic() - start:.1f} s while an image was being fetched"
        message = slow.result()
    assert "slow.png failed" in message and "timed out" in message, message
    assert FETCH_TIMEOUT <= time.monotonic() - start < 2 * FETCH_TIMEOUT


def test_a_text_only_model_refuses_images_and_by_default_local_files(live_server, media_dir):
    """The bundled text-only model, served with the default media flags."""
    api = Api(live_server)
    assert "is a text-only model: it takes no images" in api.refusal(asking(data_url(IMAGE)))
    assert "local files are not allowed here" in api.refusal(asking(str(media_dir / "image.png")))
    assert api.answer([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_tokens=2).text


def test_tokenize_takes_text_only(vl_server):
    r = httpx.post(vl_server.url + "/tokenize", json={"messages": asking(data_url(IMAGE))}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "messages[0]: images are not taken here, only text"
    r = httpx.post(vl_server.url + "/tokenize", json={"messages": asking(text="Hi")}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] > 0
