"""A Llama-3-8B-shaped model in bf16 on the GPU: tristream against transformers on the same weights."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "bench" / "configs" / "llama-3-8b.json"
PROMPT_LENS = [7, 120, 333, 1000]
STEPS = 16
NEAR_TIE = 0.05  # logit gap between the top two tokens below which bf16 may order them either way


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tristream.config import EngineConfig
    from tristream.gpu_proc.runner import ModelRunner
    from tristream.gpu_proc.weights import load_weights

    folder = tmp_path_factory.mktemp("llama3-8b")
    (folder / "config.json").write_text(CONFIG.read_text())
    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    runners = {}
    for eager in (True, False):
        engine_config = EngineConfig(
            model=str(folder), load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=2048,
            max_num_seqs=8, kv_cache_tokens=16384, enforce_eager=eager,
        )
        runner = ModelRunner(engine_config)
        load_weights(runner.model, hf.state_dict().items(), "transformers")
        runners[eager] = runner
    return hf, runners


def run_ours(runner, prompts: list[list[int]], steps: int):
    """Prefill all prompts in one step, then greedy decode; logits [steps+1] x [B, V] and tokens."""
    from tristream.protocol import BatchPlan, NewSequence
    from tristream.sampling_params import SamplingParams

    captured = []
    sampler = runner.sampler

    class Recording:
        state = sampler.state

        def __call__(self, logits, slots):
            captured.append(logits.float().clone())
            return sampler(logits, slots)

    runner.sampler = Recording()
    pages = 2048 // runner.page_size
    greedy = SamplingParams(temperature=0, seed=0)
    plan = BatchPlan(
        0, new=[NewSequence(i, p, 0, 0, greedy) for i, p in enumerate(prompts)],
        pages=[(i, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(len(prompts))],
        slots=list(range(len(prompts))), num_tokens=[len(p) for p in prompts], sample=[True] * len(prompts),
    )
    tokens = [runner.step(plan).token_ids]
    for step in range(steps):
        decode = BatchPlan(step + 1, slots=list(range(len(prompts))), num_tokens=[1] * len(prompts), sample=[True] * len(prompts))
        tokens.append(runner.step(decode).token_ids)
    runner.sampler = sampler
    return captured, torch.tensor(tokens).T.tolist()


def hf_run(hf, prompt: list[int], forced: list[int]):
    """transformers' logits along the token path ``forced`` (so both see the same inputs)."""
    rows = []
    with torch.no_grad():
        res = hf(torch.tensor([prompt], device="cuda"), use_cache=True)
        for token in forced:
            rows.append(res.logits[0, -1].float())
            res = hf(torch.tensor([[token]], device="cuda"), past_key_values=res.past_key_values, use_cache=True)
    return rows


def test_logits_and_greedy_tokens_match_transformers(models, capsys):
    hf, runners = models
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    logits, tokens = run_ours(runners[True], prompts, STEPS)
    report = []
    for i, prompt in enumerate(prompts):
        ref = hf_run(hf, prompt, tokens[i][: STEPS + 1])
        errors = []
        for step in range(STEPS + 1):
            err = ((logits[step][i] - ref[step]).norm() / ref[step].norm()).item()
            errors.append(err)
            assert err < 2e-2, f"prompt {i} step {step}: relative logit error {err:.3e}"
        diverge = None
        for step in range(STEPS + 1):
            top2 = ref[step].topk(2).values
            if int(ref[step].argmax()) != tokens[i][step]:
                gap = (top2[0] - top2[1]).item()
                assert gap < NEAR_TIE, f"prompt {i} step {step}: greedy differs with a clear gap {gap:.3f}"
                diverge = (step, gap)
                break
        report.append((len(prompt), max(errors), diverge))
    with capsys.disabled():
        print("\nprompt len | max rel logit err | first greedy divergence (step, top-2 gap)")
        for n, err, div in report:
            print(f"{n:10d} | {err:17.2e} | {div}")


def test_cuda_graphs_give_the_same_outputs_as_eager(models):
    _, runners = models
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in (5, 50, 500)]
    eager_logits, eager_tokens = run_ours(runners[True], prompts, 12)
    graph_logits, graph_tokens = run_ours(runners[False], prompts, 12)
    assert runners[False].graphs is not None and runners[True].graphs is None
    for step, (a, b) in enumerate(zip(eager_logits, graph_logits)):
        err = ((a - b).norm() / a.norm()).item()
        assert err < 1e-2, f"step {step}: graph vs eager relative error {err:.3e}"
    assert graph_tokens == eager_tokens
