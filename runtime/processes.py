"""Starting, watching and stopping the engine's child processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator

import setproctitle
import zmq

from tristream.protocol import Ipc, ProcessFailed, decode, encode

logger = logging.getLogger("tristream")

PR_SET_PDEATHSIG = 1
# What a process still has to send when it closes a socket reaches a live peer at once; a peer that has
# exited never takes it, and waiting longer for that only delays shutdown.
OUTBOX_LINGER_MS = 100


def make_ipc(num_ranks: int = 1, num_tokenizers: int = 1, host: str | None = None) -> tuple[Ipc, str]:
    """Fresh inbox addresses and the image folder, in a private temporary directory. With ``host`` (this host's
    address as other hosts reach it), the inboxes that ranks on other hosts use (the user's, the scheduler's
    and each rank's plan channel) are ``tcp://`` ports of ``host``; every other one is ``ipc://``. The
    rendezvous is left for the caller to set."""
    folder = tempfile.mkdtemp(prefix="tristream-")
    os.mkdir(os.path.join(folder, "media"))

    def addr(name: str) -> str:
        return f"ipc://{os.path.join(folder, name)}"

    def shared(name: str) -> str:
        return addr(name) if host is None else f"tcp://{host}:{free_port()}"

    ipc = Ipc(
        shared("user"),
        [addr(f"tokenizer{worker}") for worker in range(num_tokenizers)],
        shared("scheduler"),
        [shared(f"gpu{rank}") for rank in range(num_ranks)],
        "",
        os.path.join(folder, "media"),
    )
    return ipc, folder


def free_port() -> int:
    """A TCP port that no one listens on now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as its parts; a ValueError that names ``address`` when it is not one."""
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def bindable(address: str) -> str:
    """``address`` as its owner binds it: a ``tcp://`` one on every interface of this host."""
    if address.startswith("tcp://"):
        return f"tcp://*:{address.rsplit(':', 1)[1]}"
    return address


def bind_inbox(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(bindable(address))
    return sock


def connect_inbox(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A receiving socket on a channel that its one sender binds (``bind_outbox``)."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    return sock


def connect_outbox(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, OUTBOX_LINGER_MS)
    sock.connect(address)
    return sock


def bind_outbox(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A sending socket that owns its channel, so that a receiver on another host only connects to it. What is
    sent waits until the receiver is there."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, OUTBOX_LINGER_MS)
    sock.bind(bindable(address))
    return sock


def send(sock: zmq.Socket, message: object) -> None:
    sock.send(encode(message), copy=False)


def recv(sock: zmq.Socket, block: bool = True) -> object:
    """The next message; with ``block=False`` raises ``zmq.Again`` when there is none."""
    return decode(sock.recv(0 if block else zmq.NOBLOCK, copy=False).buffer)


def recv_all(sock: zmq.Socket, block: bool) -> list[object]:
    """Every queued message, first waiting for one if ``block``."""
    messages = [recv(sock)] if block else []
    while True:
        try:
            messages.append(recv(sock, block=False))
        except zmq.Again:
            return messages


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent goes away, even after ``kill -9`` of the parent."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if os.getppid() != parent_pid:
        os._exit(1)


def child_main(name: str, title: str, module: str, parent_pid: int, ipc: Ipc, *args: object) -> None:
    """Entry point of every child: guard its life, then ``run_child``."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_child(name, title, module, ipc, *args)
    except BaseException:
        sys.exit(1)
    # A clean exit skips the interpreter's teardown of torch and transformers, which takes about a second.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_child(name: str, title: str, module: str, ipc: Ipc, *args: object) -> None:
    """Show ``tristream::<title>`` in ps and top and run ``module.run(ipc, *args)``; a crash is reported to the
    engine as ``ProcessFailed`` and raised again."""
    setproctitle.setproctitle(f"tristream::{title}")
    level = getattr(args[0], "log_level", "INFO") if args else "INFO"
    logging.basicConfig(level=level, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        importlib.import_module(module).run(ipc, *args)
    except BaseException:
        error = traceback.format_exc()
        ctx = zmq.Context.instance()
        sock = connect_outbox(ctx, ipc.user)
        send(sock, ProcessFailed(name, error))
        sock.close(linger=2000)
        raise


@contextlib.contextmanager
def _no_main_reimport() -> Iterator[None]:
    """Spawned children must not re-run the user's ``__main__`` script.

    multiprocessing's spawn re-imports the main module in each child, which
    would start another engine from a script without a ``__main__`` guard.
    Our children import only tristream, so hide the main module while starting.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def spawn(name: str, module: str, ipc: Ipc, *args: object, title: str | None = None) -> mp.Process:
    """Start ``module.run(ipc, *args)`` in a spawned child process called ``name``, titled ``title`` (default: name)."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=child_main,
        args=(name, title or name, module, os.getpid(), ipc, *args),
        name=f"tristream-{name}",
        daemon=True,
    )
    with _no_main_reimport():
        proc.start()
    return proc


def exit_reason(proc: mp.Process) -> str:
    """How a child that has gone ended: its exit code, or the signal that killed it."""
    code = proc.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


async def stop(procs: list[mp.Process], timeout: float = 5.0) -> None:
    """Wait for children to exit, then kill the stragglers, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(2.0)
