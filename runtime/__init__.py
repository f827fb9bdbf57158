"""tristream: an LLM inference engine in three processes."""

from tristream.config import EngineConfig
from tristream.engine import AsyncEngine, EngineDeadError
from tristream.llm import LLM
from tristream.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tristream.pipeline import Response, pipeline
from tristream.sampling_params import GenerationConfig, SamplingParams, StructuredOutput

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "GenerationConfig",
    "LLM",
    "RequestMetrics",
    "RequestOutput",
    "Response",
    "SamplingParams",
    "StructuredOutput",
    "pipeline",
]
