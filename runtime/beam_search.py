"""Beam search: vLLM's offline ``BeamSearchParams`` and outputs, and the limits of a beam search request.

The search itself runs inside the scheduler (``tristream.scheduler_proc.beams``): every step each beam reports
its top ``2 * beam_width`` logprobs, and the scheduler keeps the best continuations by cumulative logprob, forking
beams over shared KV pages. A hypothesis's score is ``cumulative_logprob / seq_len ** length_penalty``, where
``seq_len`` counts the prompt and output tokens, an ending EOS left out (vLLM's ``get_beam_search_score``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tristream.model_config import ModelConfig
from tristream.outputs import RequestOutput
from tristream.sampling_params import MAX_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from tristream.engine import AsyncEngine


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters for ``LLM.beam_search``: ``beam_width`` beams, at most ``max_tokens`` output
    tokens each, ranked by cumulative logprob / (prompt + output length) ** ``length_penalty``. ``temperature``
    (0: the model's own) scales the logits that the logprobs come from."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def sampling_params(self, lora: str | None = None) -> SamplingParams:
        """The engine's parameters of this search: it returns every beam, each token with its top logprobs."""
        return SamplingParams(
            n=self.beam_width,
            use_beam_search=True,
            max_tokens=self.max_tokens,
            ignore_eos=self.ignore_eos,
            temperature=self.temperature,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=min(2 * self.beam_width, MAX_LOGPROBS),
            lora=lora,
        )


@dataclass
class BeamSearchSequence:
    """One hypothesis, as vLLM's: ``tokens`` are the prompt's and the output's, ``text`` their decoded text,
    ``logprobs`` each output token's top logprobs (the chosen token first)."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    """The hypotheses of one prompt, best first (``beam_width`` of them)."""

    sequences: list[BeamSearchSequence]


def check_beam_search(params: SamplingParams, max_num_seqs: int, model: ModelConfig) -> None:
    """A ValueError if this engine cannot run the beam search of ``params``: its beams need a slot each, and
    forking a beam needs pages that no sliding window has dropped."""
    if not params.use_beam_search:
        return
    if params.beam_width > max_num_seqs:
        raise ValueError(
            f"a beam search of width {params.beam_width} runs that many sequences, above max_num_seqs={max_num_seqs}"
        )
    if model.kv_window():
        raise ValueError("beam search does not run on a model whose every layer has a sliding window")


async def beam_search_outputs(engine: AsyncEngine, finals: list[RequestOutput]) -> list[BeamSearchOutput]:
    """vLLM's outputs of finished beam searches: each hypothesis with its prompt, as tokens and as text."""
    outputs = []
    for final in finals:
        sequences = []
        for beam in final.outputs:
            tokens = final.prompt_token_ids + beam.token_ids
            text = await engine.detokenize(tokens)
            sequences.append(
                BeamSearchSequence(tokens, beam.logprobs or [], beam.cumulative_logprob, text, beam.finish_reason)
            )
        outputs.append(BeamSearchOutput(sequences))
    return outputs
