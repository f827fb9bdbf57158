"""tristream: an LLM inference engine in three processes."""

import importlib.metadata

from tristream.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from tristream.config import EngineConfig
from tristream.embeddings import EmbeddingOutput, EmbeddingRequestOutput
from tristream.engine import AsyncEngine, EngineDeadError
from tristream.llm import LLM
from tristream.lmdeploy import ChatTemplateConfig, PytorchEngineConfig, TurbomindEngineConfig
from tristream.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tristream.pipeline import Response, pipeline
from tristream.pooling import PoolingParams
from tristream.sampling_params import GenerationConfig, SamplingParams, StructuredOutput

__version__ = importlib.metadata.version("tristream")

__all__ = [
    "AsyncEngine",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "ChatTemplateConfig",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineConfig",
    "EngineDeadError",
    "GenerationConfig",
    "LLM",
    "PoolingParams",
    "PytorchEngineConfig",
    "RequestMetrics",
    "RequestOutput",
    "Response",
    "SamplingParams",
    "StructuredOutput",
    "TurbomindEngineConfig",
    "pipeline",
]
