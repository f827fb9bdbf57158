"""EAGLE-3 heads: one decoder layer that drafts from the model's own hidden states.

The model keeps the residual stream entering three of its layers (2, L/2 and L-3: low, middle and high
features) for every row of an eager step (``aux_hidden``); the head's ``fc`` folds them into one hidden state per
position, kept per sequence (``Sequence.draft_hidden``) until the head has used them. The head's entry at position
i is the embedding of token i+1 (normed) beside the hidden state of position i (normed), through q/k/v twice as
wide as the model, attention over the head's own one-layer KV pool (the model's pages), and an MLP; its final norm
gives logits over its own, smaller vocabulary, whose ids ``d2t`` maps to the model's. A proposal catches up on the
positions since the last one (hidden states of the model), then drafts one token per step, each fed the head's own
hidden state before its final norm.

The checkpoint layout is the published one: ``fc``, ``midlayer.{self_attn,mlp,input_layernorm,hidden_norm,
post_attention_layernorm}``, ``norm``, ``lm_head``, ``d2t`` (and ``t2d``, unused); the embedding is the model's.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from tristream.config import EngineConfig
from tristream.gpu_proc.draft_model import by_row, span_batch
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache, allocate_kv_cache, bytes_per_token
from tristream.gpu_proc.layers.linear import Linear
from tristream.gpu_proc.layers.mlp import GatedMLP
from tristream.gpu_proc.layers.norm import RMSNorm
from tristream.gpu_proc.layers.rotary import RotaryEmbedding
from tristream.gpu_proc.models.llama import Attention, LlamaForCausalLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.gpu_proc.slot_state import Sequence
from tristream.model_config import ModelConfig
from tristream.sharding import shard_model

# Checkpoint name -> (parameter, which of its fused parts: q/k/v or gate/up, or None for the whole).
PARAMS = {
    "fc.weight": ("fc.weight", None),
    "norm.weight": ("norm.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
    "midlayer.self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "midlayer.self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "midlayer.self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "midlayer.self_attn.o_proj.weight": ("self_attn.o_proj.weight", None),
    "midlayer.mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "midlayer.mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
    "midlayer.mlp.down_proj.weight": ("mlp.down_proj.weight", None),
    "midlayer.input_layernorm.weight": ("input_layernorm.weight", None),
    "midlayer.hidden_norm.weight": ("hidden_norm.weight", None),
    "midlayer.post_attention_layernorm.weight": ("post_attention_layernorm.weight", None),
}
UNUSED = ("t2d", "embed_tokens.weight")


def aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The model layers whose input the head reads: low, middle and high features."""
    return 2, num_layers // 2, num_layers - 3


def head_config(path: str, target: ModelConfig) -> tuple[ModelConfig, int]:
    """The head's shapes (as a one-layer model of ``target``'s kind) and its vocabulary size, from ``path``'s
    config.json; ``ValueError`` if it is not an EAGLE-3 head of ``target``."""
    raw = json.loads((pathlib.Path(path) / "config.json").read_text())
    arch = (raw.get("architectures") or [""])[0]
    if "eagle3" not in arch.lower():
        raise ValueError(f"{path}: not an EAGLE-3 head (architectures {raw.get('architectures')})")
    if raw.get("vocab_size", target.vocab_size) != target.vocab_size:
        raise ValueError(f"{path}: the head's vocab_size {raw['vocab_size']} is not the model's {target.vocab_size}")
    if raw.get("target_hidden_size", raw["hidden_size"]) != target.hidden_size:
        raise ValueError(f"{path}: the head reads hidden states of {raw.get('target_hidden_size', raw['hidden_size'])}, "
                         f"the model's are {target.hidden_size} wide")  # fmt: skip
    if target.num_layers < 4:
        raise ValueError(f"an EAGLE-3 head needs a model of at least 4 layers, this one has {target.num_layers}")
    heads = raw["num_attention_heads"]
    mc = dataclasses.replace(
        target,
        architecture=arch,
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=1,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", target.rms_norm_eps),
        rope_theta=raw.get("rope_theta", target.rope_theta),
        rope_scaling=raw.get("rope_scaling", target.rope_scaling),
        attention_bias=raw.get("attention_bias", False),
        quant=None,
        quantization_config=None,
        partial_rotary_factor=1.0,
        hf={},
    )
    return mc, raw.get("draft_vocab_size") or target.vocab_size


class Eagle3Head(nn.Module):
    """The head's layers; ``embed`` is the model's embedding (not the head's parameter)."""

    def __init__(self, mc: ModelConfig, target_hidden: int, vocab: int, embed: nn.Module) -> None:
        super().__init__()
        hidden, one_rank = mc.hidden_size, TensorParallel(shard_model(mc, 1, 0), torch.device("cpu"), None)
        self.fc = Linear(3 * target_hidden, hidden)
        self.self_attn = Attention(mc, 0, one_rank, mc.attention_bias)
        q_size, kv_size = self.self_attn.q_size, self.self_attn.kv_size
        self.self_attn.qkv_proj = Linear(2 * hidden, q_size + 2 * kv_size, mc.attention_bias, parts=3)
        self.mlp = GatedMLP(hidden, mc.intermediate_size, None)
        self.input_layernorm = RMSNorm(hidden, mc.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, mc.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, mc.rms_norm_eps)
        self.norm = RMSNorm(hidden, mc.rms_norm_eps)
        self.lm_head = Linear(hidden, vocab)
        self.register_buffer("d2t", torch.zeros(vocab, dtype=torch.int64))
        self.embed = [embed]

    def forward(
        self, batch: ForwardBatch, hidden: torch.Tensor, kv: KVCache, rotary: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy token (the model's id) and the hidden state before the final norm at ``batch.logit_rows``,
        for inputs ``batch.input_ids`` beside ``hidden`` (one row each)."""
        x = torch.cat([self.input_layernorm(self.embed[0](batch.input_ids)), self.hidden_norm(hidden)], dim=-1)
        x, residual = self.post_attention_layernorm(self.self_attn(x, batch, kv, rotary), hidden)
        x, before_norm = self.norm(self.mlp(x, batch), residual)
        rows = batch.logit_rows
        tokens = self.lm_head(x[rows], batch).argmax(dim=-1)
        return tokens + self.d2t[tokens], before_norm[rows]

    def load(self, path: str) -> None:
        """The weights of the checkpoint in ``path`` (every ``*.safetensors``); ``ValueError`` names what is missing
        or unexpected."""
        params, loaded = dict(self.named_parameters()) | dict(self.named_buffers()), set()
        sizes = {"self_attn.qkv_proj.weight": self._sizes(self.self_attn), "mlp.gate_up_proj.weight": None}
        with torch.no_grad():
            for file in sorted(pathlib.Path(path).glob("*.safetensors")):
                for name, tensor in load_file(file).items():
                    if name in UNUSED:
                        continue
                    if name not in PARAMS and name != "d2t":
                        raise ValueError(f"unexpected weight {name!r} in {path}")
                    param, part = PARAMS.get(name, ("d2t", None))
                    target = params[param]
                    if part is not None:
                        parts = sizes[param] or [target.shape[0] // 2] * 2
                        start = sum(parts[:part])
                        target = target[start : start + parts[part]]
                    if target.shape != tensor.shape:
                        raise ValueError(
                            f"{path}: {name} has shape {list(tensor.shape)}, expected {list(target.shape)}"
                        )
                    target.copy_(tensor)
                    loaded.add(name)
        missing = sorted(set(PARAMS) - loaded)
        if missing:
            raise ValueError(f"weights missing from {path}: {missing}")

    @staticmethod
    def _sizes(attention: Attention) -> list[int]:
        return [attention.q_size, attention.kv_size, attention.kv_size]


class Eagle3Draft:
    """An EAGLE-3 head over ``model`` (a Llama-family decoder), proposing greedily."""

    def __init__(self, config: EngineConfig, model: nn.Module, mc: ModelConfig, dtype: torch.dtype, device) -> None:
        if type(model).hidden_states is not LlamaForCausalLM.hidden_states:
            raise ValueError(f"EAGLE-3 heads run on Llama-family decoders, not on {mc.architecture}")
        path = config.speculative.model
        self.config, self.device = config, device
        self.model_config, vocab = head_config(path, mc)
        with torch.device("meta"):
            head = Eagle3Head(self.model_config, mc.hidden_size, vocab, model.embed_tokens)
        self.head = head.to_empty(device=device)
        self.head.d2t.zero_()  # a head whose vocabulary is the model's has no map
        self.head.load(path)
        self.head.to(dtype)
        hc = self.model_config
        self.rotary = RotaryEmbedding(
            hc.head_dim, hc.rope_theta, hc.rope_scaling, config.max_model_len, device,
            max_position_embeddings=hc.max_position_embeddings,
        )  # fmt: skip
        self.target = model
        self.kv: KVCache | None = None
        self.block_tables: torch.Tensor | None = None

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """The KV bytes of one token in the head's pool."""
        return bytes_per_token(self.model_config, dtype)

    def allocate(self, num_pages: int, dtype: torch.dtype, block_tables: torch.Tensor) -> None:
        """Allocate the head's pool; start keeping the model's features (after its CUDA graphs are captured, so
        that decode graphs leave them out)."""
        self.kv = allocate_kv_cache(self.config, self.model_config, dtype, self.device, num_pages)
        self.block_tables = block_tables
        self.target.aux_layers = aux_layers(self.target.config.num_layers)

    def record(
        self,
        slots: list[int],
        counts: list[int],
        seqs: dict[int, Sequence],
        batch: ForwardBatch,
        keep: Callable[[int], bool],
    ) -> None:
        """Keep the folded features of an eager step's rows: ``counts[i]`` rows of slot ``slots[i]``, in order, at
        the positions before each sequence's ``num_computed``, for the slots that ``keep`` (those that may
        speculate). A sequence whose positions skip some (a decode step run as a CUDA graph, a cached prefix)
        takes the head's KV there as it is: drafts can only be worse for it."""
        features = self.head.fc(self.target.aux_hidden, batch)
        row = 0
        for slot, n in zip(slots, counts):
            seq = seqs[slot]
            if not keep(slot):
                row += n
                continue
            start = seq.num_computed - n
            kept = seq.draft_hidden
            if kept is None or start > kept[0] + kept[1].shape[0] or start < kept[0]:
                seq.draft_hidden = start, features[row : row + n]
                seq.draft_computed = max(seq.draft_computed, start) if kept is not None else start
            else:
                seq.draft_hidden = kept[0], torch.cat([kept[1][: start - kept[0]], features[row : row + n]])
            row += n

    @torch.inference_mode()
    def propose(self, items: list[tuple[int, Sequence, int]]) -> list[list[int]]:
        """For each (slot, sequence, room), ``room`` draft tokens (none for a sequence without features)."""
        ready = [j for j, (_, seq, _) in enumerate(items) if self._covers(seq)]
        out: list[list[int]] = [[] for _ in items]
        if not ready:
            return out
        items = [items[j] for j in ready]
        slots = [slot for slot, _, _ in items]
        spans, hidden = [], []
        for _, seq, _ in items:
            first, features = seq.draft_hidden
            end = len(seq.token_ids) - 1
            spans.append((seq, seq.draft_computed, seq.token_ids[seq.draft_computed + 1 :]))
            hidden.append(features[seq.draft_computed - first : end - first])
            seq.draft_hidden, seq.draft_computed = (end, features[end - first :]), end
        batch = span_batch(slots, spans, self.block_tables, self.model_config, self.config)
        tokens, state = self.head(batch, torch.cat(hidden), self.kv, self.rotary)
        drafts, rooms = [tokens], [room for _, _, room in items]
        for i in range(1, max(rooms)):
            live = [j for j, room in enumerate(rooms) if room > i]
            spans = [(items[j][1], len(items[j][1].token_ids) + i - 2, [0]) for j in live]
            batch = span_batch([slots[j] for j in live], spans, self.block_tables, self.model_config, self.config)
            index = torch.tensor(live, device=self.device)
            batch.input_ids = drafts[-1][index]
            step, after = self.head(batch, state[index], self.kv, self.rotary)
            drafts.append(drafts[-1].index_copy(0, index, step))
            state = state.index_copy(0, index, after)
        for j, row in zip(ready, by_row([d.tolist() for d in drafts], rooms)):
            out[j] = row
        return out

    @staticmethod
    def _covers(seq: Sequence) -> bool:
        """Whether the sequence has the model's features of every position from ``draft_computed`` to its
        newest token's."""
        if seq.draft_hidden is None or seq.draft_computed >= len(seq.token_ids) - 1:
            return False
        first, features = seq.draft_hidden
        return first <= seq.draft_computed and first + features.shape[0] >= len(seq.token_ids) - 1
