"""LoRA on the GPU (Triton shrink and expand, CUDA graphs, bf16): a batch that mixes two adapters and the
base model, each request's logprobs measured against peft's merged model in fp32 along the same tokens.

The model is a small random Llama. Adapter requests must stay within twice the base model's own bf16 error
(plus a small floor), and the adapters must move the logprobs by far more than that error.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 16
VOCAB = 1000


def tiny_llama(folder):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)  # sharp next-token distributions
    model.save_pretrained(str(folder))
    return model.eval().cuda()


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1)[torch.arange(len(tokens)), torch.tensor(tokens)].cpu()


def test_mixed_adapter_batch_tracks_fp32_reference(tmp_path) -> None:
    from tests.conftest import make_lora_adapter
    from tristream import AsyncEngine, SamplingParams
    from tristream.outputs import accumulate

    base_dir = tmp_path / "base"
    refs = {None: tiny_llama(base_dir)}
    refs["all"] = make_lora_adapter(
        str(base_dir),
        tmp_path / "all",
        0,
        scale=0.1,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ).cuda()
    refs["qv"] = make_lora_adapter(
        str(base_dir), tmp_path / "qv", 1, scale=0.1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    ).cuda()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 40, 130)]

    async def run() -> dict:
        async with AsyncEngine(
            model=str(base_dir),
            max_model_len=256,
            dtype="bfloat16",
            skip_tokenizer_init=True,
            lora_adapters={"all": str(tmp_path / "all")},
            max_loras=2,
            log_level="WARNING",
        ) as engine:
            assert engine.device.startswith("cuda")
            await engine.load_lora("qv", str(tmp_path / "qv"))

            async def one(prompt: list[int], lora: str | None):
                final = None
                params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0, lora=lora)
                async for out in engine.generate(prompt, params):
                    final = accumulate(final, out)
                return final.outputs[0]

            jobs = [(i, lora) for i in range(len(prompts)) for lora in refs]
            outs = await asyncio.gather(*(one(prompts[i], lora) for i, lora in jobs))
            return dict(zip(jobs, outs))

    outs = asyncio.run(run())
    errors: dict[str | None, float] = {}
    effects: dict[str, float] = {}
    for (i, lora), out in outs.items():
        tokens = list(out.token_ids)
        ours = torch.tensor([step[token] for step, token in zip(out.logprobs, tokens)])
        ref = reference_logprobs(refs[lora], prompts[i], tokens)
        errors[lora] = max(errors.get(lora, 0.0), (ours - ref).abs().max().item())
        if lora is not None:
            effect = (ref - reference_logprobs(refs[None], prompts[i], tokens)).abs().mean().item()
            effects[lora] = min(effects.get(lora, float("inf")), effect)
    print("largest sampled-token logprob error vs fp32:", errors, "smallest mean adapter effect:", effects)
    for lora in ("all", "qv"):
        assert errors[lora] <= 2 * errors[None] + 0.05, errors
        assert effects[lora] > 5 * errors[lora], (effects, errors)
