"""Hosts beyond the first of an engine whose ranks span several hosts (``--nnodes N``): each one runs only its
share of the tensor-parallel ranks, which the engine on host 0 drives over TCP.

``tristream serve MODEL --tp 16 --nnodes 2 --node-rank 1 --dist-init-addr HOST0:PORT`` on the second host (or
the same command with torchrun's ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) waits for the engine on
host 0, fetches its addresses and config from its store, starts the ranks and stays until they end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time

import zmq

from tristream import processes, rendezvous
from tristream.config import EngineConfig
from tristream.model_files import resolve_model
from tristream.protocol import ProcessFailed, gpu_process_name

logger = logging.getLogger("tristream")


def here(child: EngineConfig, given: EngineConfig) -> EngineConfig:
    """The engine's ``child`` config on this host: its model folder, resolved again from what was ``given`` here
    when host 0's folder is not on this host."""
    if os.path.isdir(child.model):
        return child
    return dataclasses.replace(child, model=resolve_model(given.model, given.load_format, given.download_dir))


def node_rank(config: EngineConfig) -> int:
    """This host's index: ``node_rank``, else ``$NODE_RANK``, else 0."""
    return config.node_rank if config.node_rank is not None else int(os.environ.get("NODE_RANK") or 0)


def run_node(config: EngineConfig) -> int:
    """Run this host's ranks of the engine that host 0 starts, until they end; the exit status."""
    rank0 = node_rank(config)
    address = config.dist_init_addr or rendezvous.env_address()
    if address is None:
        raise ValueError("a host other than 0 needs --dist-init-addr HOST:PORT (or MASTER_ADDR and MASTER_PORT)")
    logger.info("host %d of %d: waiting for the engine at %s", rank0, config.nnodes, address)
    store = rendezvous.connect_store(address, config.startup_timeout)
    ipc, child = rendezvous.fetch(store)
    child = here(child, config)
    per_node = child.tensor_parallel_size // child.nnodes
    procs = {}
    for device in range(per_node):
        rank = rank0 * per_node + device
        name = gpu_process_name(rank)
        procs[name] = processes.spawn(name, "tristream.gpu_proc.main", ipc, child, rank, device, title=f"gpu{rank}")
    return _watch(procs, store, ipc.user)


def _watch(procs: dict, store, user: str) -> int:
    """Wait until every rank has ended (0), one of them died (1: the engine is told which) or the engine's store
    went away (1)."""
    while True:
        dead = [name for name, proc in procs.items() if proc.exitcode not in (None, 0)]
        if dead:
            reason = f"it died on host {socket.gethostname()} ({processes.exit_reason(procs[dead[0]])})"
            sock = processes.connect_outbox(zmq.Context.instance(), user)
            processes.send(sock, ProcessFailed(dead[0], reason))
            sock.close(linger=2000)
            break
        if all(proc.exitcode == 0 for proc in procs.values()):
            return 0
        try:
            store.check([rendezvous.ENGINE_KEY])
        except RuntimeError:
            logger.error("the engine on host 0 has gone; stopping this host's ranks")
            break
        time.sleep(0.5)
    for proc in procs.values():
        proc.kill()
        proc.join(2.0)
    return 1
