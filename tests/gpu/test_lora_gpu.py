"""LoRA on the GPU (Triton segmented matmul, CUDA graphs, bf16): a batch that mixes two adapters and the
base model, each request's logprobs measured against peft's merged model in fp32 along the same tokens.

Adapter requests must stay within twice the base model's own bf16 error (plus a small floor).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 16
PROMPTS = [
    "The old lighthouse keeper climbed the stairs",
    "A recipe for bread needs flour, water,",
    "In 1969 the first people walked on",
]


def make_adapter(model_dir: str, path, seed: int, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(path))
    return model.merge_and_unload().eval().cuda()


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1 : -1].float()
    lp = logits.log_softmax(-1)
    return lp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


def test_mixed_adapter_batch_tracks_fp32_reference(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tristream import AsyncEngine, SamplingParams
    from tristream.model_files import resolve_model
    from tristream.outputs import accumulate

    model_dir = resolve_model(None)
    refs = {
        "all": make_adapter(model_dir, tmp_path / "all", 0, r=8, lora_alpha=16,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "qv": make_adapter(model_dir, tmp_path / "qv", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        None: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().cuda(),
    }
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(p).input_ids for p in PROMPTS]

    async def run() -> dict:
        async with AsyncEngine(
            max_model_len=512, dtype="bfloat16", lora_adapters={"all": str(tmp_path / "all")}, max_loras=2,
            log_level="WARNING",
        ) as engine:
            assert engine.info["gpu"]["device"].startswith("cuda")
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
    for (i, lora), out in outs.items():
        ours = [step[token] for step, token in zip(out.logprobs, out.token_ids)]
        ref = reference_logprobs(refs[lora], prompts[i], list(out.token_ids))
        err = max(abs(a - b) for a, b in zip(ours, ref))
        errors[lora] = max(errors.get(lora, 0.0), err)
    print("largest sampled-token logprob error vs fp32:", errors)
    for lora in ("all", "qv"):
        assert errors[lora] <= 2 * errors[None] + 0.05, errors
    for i in range(len(prompts)):
        assert outs[(i, "all")].token_ids != outs[(i, None)].token_ids, "the adapter must change the output"
