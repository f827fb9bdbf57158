"""Tensor-parallel ranks on Ray actors (``distributed_executor="ray"``): one engine's gpu_proc ranks placed over
the Ray cluster, in a placement group with one bundle per rank (a GPU each, or a CPU on CPU-only clusters).

The engine (the Ray driver) keeps its tokenizer workers and scheduler here; the ranks reach them, and each other,
over TCP. Ray ends the actors when the driver goes, so nothing outlives the engine.
"""

from __future__ import annotations

import os
import threading

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tristream import processes
from tristream.config import EngineConfig
from tristream.nodes import here
from tristream.protocol import Ipc, gpu_process_name

# Data-parallel replicas place their ranks at once; the first connects to the cluster.
_INIT = threading.Lock()


class RankActor:
    """Runs one gpu_proc rank in a Ray worker process."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, ipc: Ipc, config: EngineConfig, given: EngineConfig, rank: int) -> None:
        """Rank ``rank`` until the engine shuts it down; ``given`` is the engine's config as the user gave it,
        to find the model on this host."""
        name = gpu_process_name(rank)
        processes.run_child(name, f"gpu{rank}", "tristream.gpu_proc.main", ipc, here(config, given), rank, 0)


class RayRank:
    """One rank's actor, watched as a child process is: ``pid``, ``is_alive``, ``exitcode``, a ``sentinel`` that
    turns readable when the rank ends, ``kill`` and ``join``."""

    def __init__(self, actor: ray.actor.ActorHandle, pid: int, done: ray.ObjectRef) -> None:
        self.actor, self.pid, self.exitcode = actor, pid, None
        self.sentinel, self._signal = os.pipe()
        self._ended = threading.Event()
        threading.Thread(target=self._wait, args=(done,), daemon=True, name=f"ray-rank-{self.pid}").start()

    def _wait(self, done: ray.ObjectRef) -> None:
        try:
            ray.get(done)
            self.exitcode = 0
        except RayActorError:
            self.exitcode = -9  # the actor's process died
        except Exception:
            self.exitcode = 1
        self._ended.set()
        os.write(self._signal, b"x")

    def is_alive(self) -> bool:
        return not self._ended.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._ended.wait(timeout)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RayPlacement:
    """A placement group of ``size`` bundles for one engine's ranks, and the ranks' actors in it."""

    def __init__(self, size: int, config: EngineConfig) -> None:
        with _INIT:
            if not ray.is_initialized():
                ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        gpus = ray.cluster_resources().get("GPU", 0)
        self.use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
        self.bundle = {"GPU": 1.0} if self.use_gpu else {"CPU": 1.0}
        self.group = placement_group([dict(self.bundle) for _ in range(size)], strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=config.startup_timeout)
        if not ready:
            remove_placement_group(self.group)
            raise RuntimeError(
                f"the Ray cluster cannot place {size} ranks of {self.bundle} (it has {ray.cluster_resources()})"
            )
        self.host = ray.util.get_node_ip_address()

    def start(self, ipc: Ipc, config: EngineConfig, given: EngineConfig) -> dict[str, RayRank]:
        """Start every rank on its bundle, by process name."""
        actor = ray.remote(RankActor)
        handles = [
            actor.options(
                num_cpus=0 if self.use_gpu else 1,
                num_gpus=1 if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(config.tensor_parallel_size)
        ]
        pids = ray.get([handle.pid.remote() for handle in handles])  # before run, which holds the actor
        runs = [handle.run.remote(ipc, config, given, rank) for rank, handle in enumerate(handles)]
        return {
            gpu_process_name(rank): RayRank(handle, pid, run)
            for rank, (handle, pid, run) in enumerate(zip(handles, pids, runs))
        }

    def remove(self) -> None:
        remove_placement_group(self.group)
