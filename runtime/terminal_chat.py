"""``tristream chat``: a multi-turn chat with a model in the terminal."""

from __future__ import annotations

import asyncio
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
COMMANDS = "/clear forgets the conversation, /system TEXT sets the system prompt, /exit or Ctrl-D leaves"
EXIT_HINT = "(to leave, type /exit or press Ctrl-D)"


def _stats(output: RequestOutput, elapsed: float) -> str:
    """``prompt P tokens, N tokens, R tok/s`` from a request's last output; R counts the whole request's time."""
    metrics = output.metrics
    rate = metrics.num_generated_tokens / elapsed if elapsed > 0 else 0.0
    return f"prompt {metrics.num_prompt_tokens} tokens, {metrics.num_generated_tokens} tokens, {rate:.1f} tok/s"


class _Terminal:
    """Writes to stdout, dimming notes when it is a terminal."""

    def __init__(self) -> None:
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(self, text: str) -> None:
        self.write(f"\x1b[2m{text}\x1b[0m\n" if self.color else f"{text}\n")


async def _read_line(term: _Terminal) -> str | None:
    """Prompt for one line of stdin, read in a thread; None at end of input."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str | None] = loop.create_future()

    def deliver(text: str | None) -> None:
        if not line.done():
            line.set_result(text)

    def read() -> None:
        text = sys.stdin.readline()
        loop.call_soon_threadsafe(deliver, text.rstrip("\r\n") if text else None)

    term.write(PROMPT)
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

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def on_sigint(self) -> None:
        if self.answering is not None and not self.answering.done():
            self.interrupted = self.answering.cancel()
        else:
            # The terminal dropped the half-typed line; the reading thread waits for the next one.
            self.term.write("\n")
            self.term.note(EXIT_HINT)
            self.term.write(PROMPT)

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/clear":
            self.history.clear()
            self.term.note("conversation cleared" + (" (the system prompt stays)" if self.system else ""))
        elif name == "/system" and arg:
            self.system = arg
            self.term.note("system prompt set")
        elif name == "/system":
            self.term.note(f"system prompt: {self.system}" if self.system else "no system prompt")
        else:
            self.term.note(("" if name == "/help" else f"unknown command {name}; ") + f"commands: {COMMANDS}")
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
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    loop.add_signal_handler(signal.SIGINT, chat.on_sigint)
    try:
        while (line := await _read_line(term)) is not None:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not chat.command(line):
                    return
                continue
            await chat.ask(line)
        term.write("\n")
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
