"""Each engine process names itself, so that ps, top and nvidia-smi tell them apart."""

from __future__ import annotations


def title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")[0].strip()


async def test_every_child_process_shows_its_role(engine):
    titles = {name: title(pid) for name, pid in engine.child_pids.items()}
    assert titles == {
        "gpu": "tristream::gpu0",
        "tokenizer": "tristream::tokenizer",
        "scheduler": "tristream::scheduler",
    }
