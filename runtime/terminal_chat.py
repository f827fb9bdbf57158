"""``tristream chat``: a multi-turn chat with a model in the terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time

from tristream.engine import AsyncEngine
from tristream.model_files import model_name
from tristream.outputs import RequestOutput
from tristream.sampling_params import SamplingParams

PROMPT = ">>> "
MORE = "... "
BLOCK = '"""'
COMMANDS = (
    "/clear forgets the conversation, /undo drops the last exchange, /regen answers the last message again, "
    "/save FILE writes the conversation as JSON, /system TEXT sets the system prompt, /exit or Ctrl-D leaves"
)
KEYS = f"{BLOCK} opens and closes a message of several lines; the arrow keys edit a line and recall earlier ones"
EXIT_HINT = "(to leave, type /exit or press Ctrl-D)"


def _stats(output: RequestOutput, elapsed: float) -> str:
    """``prompt P tokens, N tokens, R tok/s`` from a request's last output; R counts the whole request's time."""
    metrics = output.metrics
    rate = metrics.num_generated_tokens / elapsed if elapsed > 0 else 0.0
    return f"prompt {metrics.num_prompt_tokens} tokens, {metrics.num_generated_tokens} tokens, {rate:.1f} tok/s"


class _Terminal:
    """Reads stdin and writes stdout; a terminal gets readline's line editing and history, and dimmed notes."""

    def __init__(self) -> None:
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        if self.interactive:
            with contextlib.suppress(ImportError):  # Windows has no readline; its console edits lines itself
                import readline  # noqa: F401  (importing it is what gives input() line editing and history)

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(self, text: str) -> None:
        self.write(f"\x1b[2m{text}\x1b[0m\n" if self.color else f"{text}\n")

    def dropped_line(self, prompt: str = "") -> None:
        """Ctrl-C at the prompt: the line is gone; say how to leave and prompt again."""
        self.write("\n")
        self.note(EXIT_HINT)
        self.write(prompt)


async def _read_piped_line(term: _Terminal, prompt: str) -> str | None:
    """Prompt for one line of stdin, read in a thread; None at end of input."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str | None] = loop.create_future()

    def deliver(text: str | None) -> None:
        if not line.done():
            line.set_result(text)

    def read() -> None:
        text = sys.stdin.readline()
        loop.call_soon_threadsafe(deliver, text.rstrip("\r\n") if text else None)

    term.write(prompt)
    # A daemon thread, unlike an executor's, cannot hold up the exit while it waits for input.
    threading.Thread(target=read, name="chat-input", daemon=True).start()
    return await line


class _Chat:
    """The conversation and the answer being streamed, if any."""

    def __init__(self, engine: AsyncEngine, params: SamplingParams, system: str | None, term: _Terminal) -> None:
        self.engine = engine
        self.params = params
        self.system = system
        self.term = term
        self.history: list[dict] = []
        self.answering: asyncio.Task | None = None
        self.interrupted = False
        self.reading = False
        self.loop = asyncio.get_running_loop()

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def on_sigint(self, signum: int, frame: object) -> None:
        """Ctrl-C: stop the answer being streamed, or else drop the line being typed."""
        if self.answering is not None and not self.answering.done():
            self.interrupted = self.answering.cancel()
            self.loop.call_soon_threadsafe(lambda: None)  # wakes the loop to carry out the cancellation
        elif self.reading:
            raise KeyboardInterrupt  # readline drops the line, and input() raises it
        elif not self.term.interactive:
            # The terminal dropped the half-typed line; the reading thread waits for the next one.
            self.loop.call_soon_threadsafe(self.term.dropped_line, PROMPT)

    async def read_line(self, prompt: str) -> str | None:
        """One line; None at end of input. Ctrl-C at a terminal's prompt raises KeyboardInterrupt."""
        if not self.term.interactive:
            return await _read_piped_line(self.term, prompt)
        # readline drops the typed line on Ctrl-C only when input() runs on the main thread, so input() holds the
        # loop, which has nothing else to do between answers.
        self.reading = True
        try:
            return input(prompt)
        except EOFError:
            return None
        finally:
            self.reading = False

    async def read_message(self) -> str | None:
        """The next message: a line, or the lines from one that opens with \"\"\" to one that ends with it."""
        line = await self.read_line(PROMPT)
        if line is None or not line.lstrip().startswith(BLOCK):
            return line
        text = line.lstrip()[len(BLOCK) :]
        while not text.rstrip().endswith(BLOCK):
            more = await self.read_line(MORE)
            if more is None:
                return None
            text += "\n" + more
        return text.rstrip()[: -len(BLOCK)]

    def save(self, path: str) -> None:
        """Write the conversation, the system prompt first, as a JSON list of OpenAI-style messages."""
        try:
            with open(os.path.expanduser(path), "w", encoding="utf-8") as f:
                json.dump(self.messages(), f, ensure_ascii=False, indent=2)
        except OSError as e:
            self.term.note(f"error: cannot write {path}: {e.strerror}")
            return
        self.term.note(f"saved {len(self.messages())} messages to {path}")

    async def command(self, line: str) -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/clear":
            self.history.clear()
            self.term.note("conversation cleared" + (" (the system prompt stays)" if self.system else ""))
        elif name in ("/undo", "/regen") and not self.history:
            self.term.note(f"{name}: the conversation is empty")
        elif name == "/undo":
            del self.history[-2:]
            self.term.note("last exchange dropped")
        elif name == "/regen":
            question = self.history[-2]["content"]
            del self.history[-2:]
            await self.ask(question)
        elif name == "/save" and arg:
            self.save(arg)
        elif name == "/save":
            self.term.note("usage: /save FILE")
        elif name == "/system" and arg:
            self.system = arg
            self.term.note("system prompt set")
        elif name == "/system":
            self.term.note(f"system prompt: {self.system}" if self.system else "no system prompt")
        else:
            self.term.note(("" if name == "/help" else f"unknown command {name}; ") + f"commands: {COMMANDS}; {KEYS}")
        return True

    async def ask(self, text: str) -> None:
        """Stream the answer to ``text``; a Ctrl-C stops it and keeps what came so far."""
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        last: RequestOutput | None = None

        async def stream() -> None:
            nonlocal last
            async for out in self.engine.chat(self.messages(), self.params):
                parts.append(out.outputs[0].text)
                last = out
                self.term.write(out.outputs[0].text)

        start = time.perf_counter()
        self.interrupted = False
        self.answering = asyncio.ensure_future(stream())
        try:
            await self.answering
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
        except ValueError as e:
            self.history.pop()
            if parts:
                self.term.write("\n")
            self.term.note(f"error: {e}" + (" (/clear starts a new conversation)" if self.history else ""))
            return
        finally:
            self.answering = None
        answer = "".join(parts)
        if answer:
            self.history.append({"role": "assistant", "content": answer})
        else:
            self.history.pop()
        stats = _stats(last, time.perf_counter() - start) if last is not None else ""
        self.term.write("\n")
        if self.interrupted:
            self.term.note(f"[stopped; {stats}]" if stats else "[stopped]")
        else:
            self.term.note(f"[{stats}]")


async def run_chat(engine: AsyncEngine, params: SamplingParams, system: str | None = None) -> None:
    """Chat in the terminal until /exit or end of input; Ctrl-C stops the answer being streamed."""
    await engine.start()
    term = _Terminal()
    chat = _Chat(engine, params, system, term)
    model = model_name(engine.config.model) + (f" + LoRA {params.lora}" if params.lora else "")
    term.note(f"tristream chat with {model} on {engine.device}. {COMMANDS}; Ctrl-C stops an answer.")
    term.note(f"{KEYS}; /help lists the commands.")
    # A Python-level handler rather than the loop's: it runs inside input() too, where readline needs it.
    previous = signal.signal(signal.SIGINT, chat.on_sigint)
    try:
        while True:
            try:
                text = await chat.read_message()
            except KeyboardInterrupt:
                term.dropped_line()
                continue
            if text is None:
                break
            text = text.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not await chat.command(text):
                    return
                continue
            await chat.ask(text)
        term.write("\n")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
