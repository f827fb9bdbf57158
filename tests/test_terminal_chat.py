"""``tristream chat`` in a terminal: history, line editing, commands, Ctrl-C, Ctrl-D and a clean exit."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time

import pexpect

from tests.conftest import wait_gone  # pytest has imported the conftest under this name
from tristream import SamplingParams
from tristream.terminal_chat import MORE, PROMPT, run_chat

STATS = re.compile(r"\[(stopped; )?prompt (\d+) tokens, (\d+) tokens, (\d+\.\d) tok/s\]")
CHAT = [sys.executable, "-m", "tristream", "chat", "--temperature", "0", "--max-model-len", "1024"]
LEFT, UP = "\x1b[D", "\x1b[A"


def spawn(*flags: str) -> pexpect.spawn:
    child = pexpect.spawn(CHAT[0], CHAT[1:] + list(flags), encoding="utf-8", timeout=90)
    child.expect(r"tristream chat with \S+ on \w+\. /clear .* /system TEXT .* /exit or Ctrl-D")
    child.expect_exact(PROMPT)
    return child


def turn(child: pexpect.spawn, text: str) -> tuple[int, int]:
    """Send one message; the prompt and answer token counts of its finished answer."""
    child.sendline(text)
    child.expect(STATS)
    stopped, prompt_tokens, tokens, rate = child.match.groups()
    assert stopped is None and float(rate) > 0
    child.expect_exact(PROMPT)
    return int(prompt_tokens), int(tokens)


def interrupt(child: pexpect.spawn, text: str) -> tuple[int, int]:
    """Send one message and press Ctrl-C once its answer streams; the stopped answer's token counts."""
    child.sendline(text)
    child.expect_exact(text + "\r\n")
    child.expect(r"\w\w")
    child.sendintr()
    child.expect(STATS)
    stopped, prompt_tokens, tokens, _ = child.match.groups()
    assert stopped
    child.expect_exact(PROMPT)
    return int(prompt_tokens), int(tokens)


def children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (FileNotFoundError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def test_history_commands_and_exit():
    child = spawn("--max-tokens", "8")
    first, answer = turn(child, "My name is Alice.")
    second, _ = turn(child, "What is my name?")
    assert second > first + answer  # the first exchange is in the second prompt

    child.sendline("/nope")
    child.expect_exact("unknown command /nope; commands: /clear")
    child.expect_exact(PROMPT)
    child.sendline("   ")
    child.expect_exact(PROMPT)
    assert child.before.strip() == ""

    child.sendline("/clear")
    child.expect_exact("conversation cleared")
    child.expect_exact(PROMPT)
    assert turn(child, "My name is Alice.")[0] == first

    child.sendline("/system You are a pirate.")
    child.expect_exact("system prompt set")
    child.expect_exact(PROMPT)
    child.sendline("/clear")
    child.expect_exact("conversation cleared (the system prompt stays)")
    child.expect_exact(PROMPT)
    assert turn(child, "My name is Alice.")[0] != first

    # Ctrl-C at the prompt drops the half-typed line and only hints how to leave.
    child.send("half-typed")
    child.expect_exact("half-typed")  # readline loses a Ctrl-C that lands while it is reading a key
    child.sendintr()
    child.expect_exact("to leave, type /exit or press Ctrl-D")
    child.expect_exact(PROMPT)
    child.sendline("/nope")
    child.expect_exact("unknown command /nope;")
    child.expect_exact(PROMPT)

    engine_pids = children(child.pid)
    assert len(engine_pids) >= 3
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    assert wait_gone(engine_pids) == []


def test_line_editing_multi_line_messages_and_commands(tmp_path):
    child = spawn("--max-tokens", "8")
    # The arrow keys move in the line and recall earlier lines instead of typing escape codes.
    child.send(f"/nope{LEFT}{LEFT}X\r")
    child.expect_exact("unknown command /noXpe; commands: /clear")
    child.expect_exact(PROMPT)
    child.send(f"{UP}\r")
    child.expect_exact("unknown command /noXpe;")
    child.expect_exact(PROMPT)

    # A message between """ and """ runs over several lines; Ctrl-C drops the whole message.
    child.sendline('"""/system You are')
    child.expect_exact(MORE)
    child.sendline('a pirate."""')
    child.expect_exact("system prompt set")
    child.expect_exact(PROMPT)
    child.sendline("/system")
    child.expect_exact("system prompt: You are\r\na pirate.")
    child.expect_exact(PROMPT)
    child.sendline('"""')
    child.expect_exact(MORE)
    child.send("half-typed")
    child.expect_exact("half-typed")
    child.sendintr()
    child.expect_exact("to leave, type /exit or press Ctrl-D")
    child.expect_exact(PROMPT)

    for name in ("/undo", "/regen"):
        child.sendline(name)
        child.expect_exact(f"{name}: the conversation is empty")
        child.expect_exact(PROMPT)
    first, _ = turn(child, "My name is Alice.")
    second, answer = turn(child, "What is my name?")
    assert turn(child, "/regen") == (second, answer)  # the same conversation, answered again greedily

    child.sendline("/save")
    child.expect_exact("usage: /save FILE")
    child.sendline(f"/save {tmp_path}/missing/chat.json")
    child.expect_exact(f"error: cannot write {tmp_path}/missing/chat.json: No such file or directory")
    child.sendline(f"/save {tmp_path}/chat.json")
    child.expect_exact(f"saved 5 messages to {tmp_path}/chat.json")
    child.expect_exact(PROMPT)
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert [saved[0]["content"], saved[1]["content"], saved[3]["content"]] == [
        "You are\na pirate.",
        "My name is Alice.",
        "What is my name?",
    ]

    child.sendline("/undo")
    child.expect_exact("last exchange dropped")
    child.expect_exact(PROMPT)
    assert turn(child, "What is my name?")[0] == second  # the dropped exchange is gone, the first one stays
    child.sendline("/undo")
    child.expect_exact(PROMPT)
    child.sendline("/undo")
    child.expect_exact(PROMPT)
    assert turn(child, "My name is Alice.")[0] == first
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_ctrl_c_stops_an_answer_and_ctrl_d_leaves():
    child = spawn("--max-tokens", "400", "--ignore-eos")
    first, partial = interrupt(child, "Tell me a long story about a dragon.")
    assert 0 < partial < 400
    second, _ = interrupt(child, "Go on.")
    assert second > first + partial  # the stopped answer stays in the history

    engine_pids = children(child.pid)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    assert wait_gone(engine_pids) == []


async def test_a_failed_request_is_dropped_and_ctrl_c_aborts_the_request(engine, capsys, monkeypatch):
    read_fd, write_fd = os.pipe()
    monkeypatch.setattr(sys, "stdin", open(read_fd))
    previous = signal.getsignal(signal.SIGINT)
    # The longest answer that fits the 1024-token context after the second prompt's 37 tokens.
    params = SamplingParams(temperature=0, max_tokens=980, ignore_eos=True)
    output, seen = "", 0

    async def shown(pattern: str) -> re.Match:
        """The next match of ``pattern`` in the chat's output after the last one."""
        nonlocal output, seen
        deadline = time.monotonic() + 60
        while (match := re.compile(pattern, re.S).search(output, seen)) is None:
            assert time.monotonic() < deadline, output
            await asyncio.sleep(0.02)
            output += capsys.readouterr().out
        seen = match.end()
        return match

    with open(write_fd, "w", buffering=1) as feed:
        chat = asyncio.ensure_future(run_chat(engine, params))
        await shown(re.escape(PROMPT))
        feed.write("word " * 1100 + "\n")
        assert "max_model_len" in (await shown(r"error: [^\n]*\n")).group(0)
        await shown(re.escape(PROMPT))
        feed.write("Count from one to one thousand.\n")
        await shown(r"\w\w")
        os.kill(os.getpid(), signal.SIGINT)
        stopped, prompt_tokens, tokens, _ = (await shown(STATS.pattern)).groups()
        assert stopped and int(tokens) < 980 and int(prompt_tokens) < 100
        deadline = time.monotonic() + 5
        while (stats := await engine.get_stats()).num_running + stats.num_waiting:
            assert time.monotonic() < deadline, "the stopped request still runs"
            await asyncio.sleep(0.05)
        await shown(re.escape(PROMPT))
        feed.write("/exit\n")
        await asyncio.wait_for(chat, 10)
    assert signal.getsignal(signal.SIGINT) is previous
