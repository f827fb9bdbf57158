"""LoRA adapters: greedy outputs equal peft's merged model, adapters mix in one batch, the prefix cache
keys on the adapter, and adapters load and unload at run time."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import hf_greedy, make_lora_adapter  # pytest has imported the conftest under this name
from tristream import AsyncEngine, SamplingParams
from tristream.outputs import accumulate

NEW_TOKENS = 12
PROMPTS = [
    "The old lighthouse keeper climbed the stairs",
    "A recipe for bread needs flour, water,",
    "In 1969 the first people walked on",
    "Lighthouses were built along dangerous coasts to warn ships away from rocks at night. Their keepers lived in "
    "small cottages beside the towers, trimming the wicks and polishing the great lenses every day, and",
]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir: str, hf_model, prompt_ids) -> dict[str, tuple[str, list[list[int]]]]:
    """name -> (directory, greedy tokens of each prompt under peft's merged model)."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "all": dict(r=8, lora_alpha=16, target_modules=ALL_MODULES),
        "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "mlp": dict(r=8, lora_alpha=8, target_modules=["gate_proj", "down_proj"]),
        "wide": dict(r=32, lora_alpha=32, target_modules=["o_proj"]),
    }
    out = {}
    for seed, (name, spec) in enumerate(specs.items()):
        merged = make_lora_adapter(model_dir, root / name, seed, **spec)
        out[name] = (str(root / name), [hf_greedy(merged, ids, NEW_TOKENS) for ids in prompt_ids])
    out["base"] = ("", [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids])
    return out


@pytest.fixture(scope="module")
async def lora_engine(adapters):
    async with AsyncEngine(
        max_model_len=1024,
        lora_adapters={"all": adapters["all"][0]},
        max_loras=2,
        max_lora_rank=8,
        check_invariants=True,
        log_level="WARNING",
    ) as eng:
        yield eng


def greedy(lora: str | None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, lora=lora)


async def run(engine: AsyncEngine, ids: list[int], params: SamplingParams):
    final = None
    async for out in engine.generate(ids, params):
        final = accumulate(final, out)
    return final.outputs[0].token_ids, final.num_cached_tokens


async def test_start_up_adapter_matches_peft_merged_model(lora_engine, adapters, prompt_ids) -> None:
    for i, ids in enumerate(prompt_ids[:3]):
        tokens, _ = await run(lora_engine, ids, greedy("all"))
        assert tokens == adapters["all"][1][i]
        assert tokens != adapters["base"][1][i], "the adapter must change the output"


async def test_run_time_adapters_mix_in_one_batch(lora_engine, adapters, prompt_ids) -> None:
    await lora_engine.load_lora("qv", adapters["qv"][0])
    assert set(lora_engine.lora_adapters) == {"all", "qv"}
    jobs = [(name, i) for i in range(3) for name in ("all", "qv", "base")]
    results = await asyncio.gather(
        *(run(lora_engine, prompt_ids[i], greedy(None if name == "base" else name)) for name, i in jobs)
    )
    for (name, i), (tokens, _) in zip(jobs, results):
        assert tokens == adapters[name][1][i], (name, i)


async def test_prefix_cache_keys_on_the_adapter(lora_engine, adapters, prompt_ids) -> None:
    ids = prompt_ids[3]  # run by no test before
    assert len(ids) > 32
    base_tokens, _ = await run(lora_engine, ids, greedy(None))
    assert base_tokens == adapters["base"][1][3]
    tokens, cached = await run(lora_engine, ids, greedy("all"))
    assert cached == 0, "pages computed without the adapter must not serve it"
    assert tokens == adapters["all"][1][3]
    again, cached_again = await run(lora_engine, ids, greedy("all"))
    assert again == tokens and cached_again == (len(ids) - 1) // 16 * 16


async def test_bad_adapter_requests_fail_clearly(lora_engine, adapters, prompt_ids, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'"):
        await run(lora_engine, prompt_ids[0], greedy("nope"))
    with pytest.raises(ValueError, match="already loaded"):
        await lora_engine.load_lora("qv", adapters["qv"][0])
    with pytest.raises(ValueError, match="slots are taken"):
        await lora_engine.load_lora("mlp", adapters["mlp"][0])
    with pytest.raises(ValueError, match="rank 32 is above"):
        await lora_engine.load_lora("wide", adapters["wide"][0])
    with pytest.raises(ValueError, match="no adapter_config.json"):
        await lora_engine.load_lora("empty", str(tmp_path))
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        await lora_engine.load_lora("dora", str(bad))
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        await lora_engine.unload_lora("nope")
    tokens, _ = await run(lora_engine, prompt_ids[1], greedy("qv"))
    assert tokens == adapters["qv"][1][1], "errors leave the engine serving"


async def test_unload_frees_the_slot_for_another_adapter(lora_engine, adapters, prompt_ids) -> None:
    stream = lora_engine.generate(prompt_ids[0], greedy("qv"))
    await stream.__anext__()
    with pytest.raises(ValueError, match="requests running"):
        await lora_engine.unload_lora("qv")
    await stream.aclose()
    await lora_engine.unload_lora("qv")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'qv'"):
        await run(lora_engine, prompt_ids[0], greedy("qv"))
    await lora_engine.load_lora("mlp", adapters["mlp"][0])
    for i, ids in enumerate(prompt_ids):
        tokens, cached = await run(lora_engine, ids, greedy("mlp"))
        assert tokens == adapters["mlp"][1][i] and cached == 0, "the reused slot must not serve the old adapter"


async def test_engine_without_lora_slots_refuses_to_load(engine, adapters) -> None:
    with pytest.raises(ValueError, match="no LoRA slots"):
        await engine.load_lora("all", adapters["all"][0])
