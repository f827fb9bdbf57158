"""Where an engine's processes meet: a file when every rank runs on this host, else a torch.distributed
``TCPStore`` that the engine hosts.

The tensor-parallel ranks form their process group on it, wherever they run (Ray actors, other hosts). A host
beyond the first (``tristream serve ... --nnodes N --node-rank K``) fetches the engine's
addresses and config from it, and watches it to learn when the engine has gone.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta
from typing import TYPE_CHECKING

from tristream.config import EngineConfig
from tristream.processes import split_address
from tristream.protocol import Ipc

if TYPE_CHECKING:  # the engine imports this module; torch loads only once a store is made
    from torch.distributed import Store, TCPStore

ENGINE_KEY = "tristream/engine"


def env_address() -> str | None:
    """torchrun's ``MASTER_ADDR:MASTER_PORT``, when both are set."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{host}:{port}" if host and port else None


def host_store(host: str, port: int = 0) -> TCPStore:
    """The engine's store, listening on ``port`` of every interface (0: a free one); others reach it at
    ``host``."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, is_master=True, wait_for_workers=False)


def connect_store(address: str, timeout: float) -> TCPStore:
    """A client of the store at ``address`` (``HOST:PORT``), waiting up to ``timeout`` seconds for it."""
    from torch.distributed import TCPStore

    host, port = split_address(address)
    return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))


def rank_store(address: str, world_size: int, timeout: float = 300.0) -> Store:
    """Where the tensor-parallel ranks form their process group: a file (``file://PATH``) when they all run on
    one host, else their part of the engine's store (``tcp://HOST:PORT``)."""
    from torch.distributed import FileStore, PrefixStore

    if address.startswith("file://"):
        return FileStore(address.removeprefix("file://"), world_size)
    return PrefixStore("ranks", connect_store(address.removeprefix("tcp://"), timeout))


def publish(store: TCPStore, ipc: Ipc, config: EngineConfig) -> None:
    """Let the other hosts' ranks find the engine: its addresses and the config its processes run with."""
    store.set(ENGINE_KEY, pickle.dumps((ipc, config)))


def fetch(store: TCPStore) -> tuple[Ipc, EngineConfig]:
    """The addresses and config that the engine published, waiting for them."""
    return pickle.loads(store.get(ENGINE_KEY))
