"""tristream: an LLM inference engine in three processes."""

import importlib.metadata

from tristream.config import EngineConfig
from tristream.engine import AsyncEngine, EngineDeadError
from tristream.llm import LLM
from tristream.lmdeploy import ChatTemplateConfig, PytorchEngineConfig, TurbomindEngineConfig
from tristream.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tristream.pipeline import Response, pipeline
from tristream.sampling_params import GenerationConfig, SamplingParams, StructuredOutput

__version__ = importlib.metadata.version("tristream")

__all__ = [
    "AsyncEngine",
    "ChatTemplateConfig",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "GenerationConfig",
    "LLM",
    "PytorchEngineConfig",
    "RequestMetrics",
    "RequestOutput",
    "Response",
    "SamplingParams",
    "StructuredOutput",
    "TurbomindEngineConfig",
    "pipeline",
]
