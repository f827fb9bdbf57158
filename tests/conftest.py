"""Shared fixtures: one engine and one transformers model for the whole session."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; it must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tristream import AsyncEngine  # noqa: E402
from tristream.model_files import resolve_model  # noqa: E402

@pytest.fixture(scope="session")
def model_dir() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
async def engine():
    async with AsyncEngine(max_model_len=1024, check_invariants=True, log_level="WARNING") as eng:
        yield eng


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def alive():
    """``alive(pid)``: True while the process runs (a zombie counts as gone)."""
    return _alive
