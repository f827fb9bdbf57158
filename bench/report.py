"""What every benchmark report records besides its figures: the machine, the code and the model."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
from collections.abc import Callable

from tristream.model_config import ModelConfig

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
# The source checkout that holds bench/, or None where the package is installed (bench/ is then tristream/bench/).
CHECKOUT = HERE.parent if HERE.name == "bench" and (HERE.parent / "pyproject.toml").is_file() else None
# Reports go to bench/results/ in a checkout, else to bench-results/ in the working directory.
RESULTS = CHECKOUT / "bench" / "results" if CHECKOUT else pathlib.Path("bench-results")


def cpu_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}


def git_info() -> dict:
    """The checkout's commit; ``$GIT_COMMIT`` / ``$GIT_DIRTY``, when set, name it instead (a copied tree or an
    installed package)."""
    if os.environ.get("GIT_COMMIT") or CHECKOUT is None:
        return {"commit": os.environ.get("GIT_COMMIT"), "dirty": os.environ.get("GIT_DIRTY")}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=CHECKOUT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": os.environ.get("GIT_COMMIT"), "dirty": os.environ.get("GIT_DIRTY")}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def header(benchmark: str, started: str) -> dict:
    """The fields every report opens with: what ran, when, where, on which code."""
    import torch
    import transformers

    return {
        "benchmark": benchmark,
        "started": started,
        "finished": now(),
        "device": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "git": git_info(),
    }


def model_summary(mc: ModelConfig, dtype: str) -> dict:
    return {
        "architecture": mc.architecture,
        "layers": mc.num_layers,
        "hidden": mc.hidden_size,
        "intermediate": mc.intermediate_size,
        "heads": mc.num_heads,
        "kv_heads": mc.num_kv_heads,
        "head_dim": mc.head_dim,
        "vocab": mc.vocab_size,
        "dtype": dtype,
    }


def write_report(
    report: dict,
    name: str,
    gpu: str | None,
    out: str | None,
    plot: Callable[[dict, pathlib.Path], None] | None = None,
    suffix: str = "",
) -> pathlib.Path:
    """The JSON at ``out`` (default ``RESULTS/<name>-<gpu><suffix>.json``), and its PNG beside it when
    matplotlib is installed."""
    path = pathlib.Path(out or RESULTS / f"{name}-{gpu_label(gpu)}{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        try:
            plot(report, path.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: plot skipped")
    print(f"wrote {path}")
    return path


def gpu_label(name: str | None) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``; no GPU -> ``cpu``."""
    return name.replace("NVIDIA ", "").replace(" ", "-").lower() if name else "cpu"
