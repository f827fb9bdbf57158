"""Image prefill and decode with images in context, on a vision-language model with dummy weights.

    python bench/vision.py     # GPU: dummy Qwen2.5-VL-7B in bf16, one 1024x1024 image per request

Prefill: batches of 1, 8 and 32 requests of one image each (distinct images, prefix cache off), one output token
each, give images/s. The same prompts with text in place of the image tokens (as long, no vision encoder) run
on the same engine, and ``vision_share`` is the part of the image run's time that the text run does not take:
preprocessing in the tokenizer process, the pixel files and the vision encoder. The encoder then runs alone in
this process on the same number of images: ``encoder_share`` is its time over the image run's, and
``encoder_matmul_fraction`` its matmul work per second over the bf16 matmul rate measured in the same run.

Decode: a batch of requests with an image in context, greedy, against the same-length text prompts on the
same engine (``vs_text``) and on the text-only language model in the same run (``vs_text_model``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from tristream import AsyncEngine, SamplingParams
from tristream.bench.ceilings import matmul_rate
from tristream.bench.report import CONFIGS, git_info, model_summary, now, write_report
from tristream.model_config import ModelConfig

TEXT_AROUND = 16  # text tokens before and after the image


# Qwen2.5-VL's preprocessor_config.json.
PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def model_folder(config: str, max_len: int) -> pathlib.Path:
    """A dummy-weight model folder: ``config`` with room for ``max_len`` tokens, and Qwen2.5-VL's image processor."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tristream-bench-"))
    raw = json.loads(pathlib.Path(config).read_text())
    raw["max_position_embeddings"] = max(raw.get("max_position_embeddings", 0), max_len)
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return folder


def image(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def random_ids(n: int, mc: ModelConfig, gen: torch.Generator) -> list[int]:
    """``n`` random token ids of ordinary text."""
    return torch.randint(100, mc.hf.get("vision_start_token_id", mc.vocab_size), (n,), generator=gen).tolist()


def image_prompt(mc: ModelConfig, gen: torch.Generator) -> list[int]:
    """Random text, one image placeholder, random text."""
    text = random_ids(2 * TEXT_AROUND, mc, gen)
    hf = mc.hf
    return [*text[:TEXT_AROUND], hf["vision_start_token_id"], hf["image_token_id"], hf["vision_end_token_id"]] + text[
        TEXT_AROUND:
    ]


def vision_flops(mc: ModelConfig, patches: int) -> float:
    """Matmul FLOPs of Qwen2.5-VL's vision encoder on ``patches`` patches: blocks (qkv, proj, gated MLP) on every
    patch, the merger on every four."""
    v = mc.hf["vision_config"]
    h, i, depth, merged = v["hidden_size"], v["intermediate_size"], v["depth"], 4 * v["hidden_size"]
    per_patch = depth * (4 * h * h + 3 * h * i) + 3 * 2 * 14 * 14 * h
    merger = merged * merged + merged * v["out_hidden_size"]
    return 2 * (patches * per_patch + patches // 4 * merger)


async def run(engine: AsyncEngine, prompts: list, output_len: int) -> tuple[float, list]:
    """Wall seconds of all ``prompts`` at once, greedy, ``output_len`` tokens each; each one's token times."""

    async def one(prompt) -> list[float]:
        times = []
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)):
            times += [time.perf_counter()] * len(out.outputs[0].token_ids)
        return times

    start = time.perf_counter()
    times = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start, times


def tpot(times: list[list[float]]) -> float:
    """Steady decode: seconds per step from the moment every request has its first token until the first ends."""
    begin, end = max(t[0] for t in times), min(t[-1] for t in times)
    return (end - begin) / statistics.mean(sum(begin < x <= end for x in t) for t in times)


async def prefill(engine: AsyncEngine, mc: ModelConfig, args: argparse.Namespace, tokens: int) -> list[dict]:
    gen, rows, seed = torch.Generator().manual_seed(0), [], 1000
    for batch in args.batch_sizes:
        prompts = [image_prompt(mc, gen) for _ in range(batch)]
        media = [
            {"prompt_token_ids": p, "multimodal_data": {"image": [image(seed + i, args.image_size)]}}
            for i, p in enumerate(prompts)
        ]
        seed += batch
        image_s, _ = await run(engine, media, 1)
        text = [random_ids(tokens, mc, gen) for _ in range(batch)]
        text_s, _ = await run(engine, text, 1)
        flops = batch * vision_flops(mc, args.patches)
        rows.append(
            {
                "batch": batch,
                "prompt_tokens": tokens,
                "image_s": image_s,
                "text_s": text_s,
                "images_per_s": batch / image_s,
                "vision_share": (image_s - text_s) / image_s,
                "encoder_tflop": flops / 1e12,
            }
        )
        print(rows[-1], flush=True)
    return rows


async def decode(engine: AsyncEngine, mc: ModelConfig, args: argparse.Namespace, tokens: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    media = [
        {"prompt_token_ids": image_prompt(mc, gen), "multimodal_data": {"image": [image(5000 + i, args.image_size)]}}
        for i in range(args.decode_batch)
    ]
    _, times = await run(engine, media, args.output_len)
    text = [random_ids(tokens, mc, gen) for _ in range(args.decode_batch)]
    _, text_times = await run(engine, text, args.output_len)
    return {
        "batch": args.decode_batch,
        "output_len": args.output_len,
        "tpot_s": tpot(times),
        "text_tpot_s": tpot(text_times),
    }


async def text_model_tpot(args: argparse.Namespace, tokens: int) -> float:
    folder = model_folder(args.text_config, tokens + args.output_len + 64)
    mc, gen = ModelConfig.load(str(folder)), torch.Generator().manual_seed(2)
    text = [random_ids(tokens, mc, gen) for _ in range(args.decode_batch)]
    async with AsyncEngine(str(folder), **engine_args(args)) as engine:
        await run(engine, text[:1], 4)
        _, times = await run(engine, text, args.output_len)
    shutil.rmtree(folder, ignore_errors=True)
    return tpot(times)


def engine_args(args: argparse.Namespace) -> dict:
    return dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        max_model_len=args.max_len,
        max_num_seqs=max(max(args.batch_sizes), args.decode_batch),
        max_num_batched_tokens=args.max_num_batched_tokens,
        limit_mm_per_prompt={"image": 1},
        log_level="WARNING",
    )


def preprocessing(folder: pathlib.Path, size: int) -> tuple[int, float]:
    """The patches of a ``size`` x ``size`` image, and the seconds the tokenizer process's image processor takes."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    patches = int(np.prod(processor(images=[image(0, size)], return_tensors="np")["image_grid_thw"][0]))
    start = time.perf_counter()
    for seed in range(3):
        processor(images=[image(seed, size)], return_tensors="np")
    return patches, (time.perf_counter() - start) / 3


def encoder_seconds(
    folder: pathlib.Path, mc: ModelConfig, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """The vision encoder alone, in this process with random weights: seconds to read the pixel files and to
    encode them, for each batch of images (the median of three runs after a warm-up)."""
    from tristream.gpu_proc.images import read_pixels
    from tristream.gpu_proc.models import model_class
    from tristream.gpu_proc.parallel import TensorParallel
    from tristream.sharding import shard_model
    from tristream.tokenizer_proc.images import PromptImages, remove_files

    shard = shard_model(mc, 1, 0)
    with torch.device("meta"):
        model = model_class(mc.architecture)(mc, shard, TensorParallel(shard, device, None))
    model.vision.load(device, torch.bfloat16, dummy=True)
    prompts = PromptImages(str(folder), mc, tempfile.mkdtemp(prefix="tristream-bench-"), max(args.batch_sizes))
    rows = []
    for batch in args.batch_sizes:
        ids = [mc.hf["image_token_id"]] * batch
        _, images = prompts.expand(ids, [image(7000 + i, args.image_size) for i in range(batch)])
        read = _median(lambda batch: [read_pixels(i) for i in batch], images)
        encode = _median(model.vision, images, device)
        rows.append({"batch": batch, "read_pixels_s": read, "encode_s": encode})
        remove_files(images)
    return rows


def _median(fn, *args: object) -> float:
    fn(*args)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def main(args: argparse.Namespace) -> dict:
    args.flops = matmul_rate(torch.device("cuda"))
    torch.cuda.empty_cache()
    folder = model_folder(args.config, 1 << 16)
    args.patches, preprocess_s = preprocessing(folder, args.image_size)
    tokens = 2 * TEXT_AROUND + 2 + args.patches // 4
    args.max_len = tokens + args.output_len + 64
    mc = ModelConfig.load(str(folder))
    async with AsyncEngine(str(folder), **engine_args(args)) as engine:
        gen = torch.Generator().manual_seed(3)
        await run(
            engine,
            [{"prompt_token_ids": image_prompt(mc, gen), "multimodal_data": {"image": [image(9, args.image_size)]}}],
            4,
        )
        prefills = await prefill(engine, mc, args, tokens)
        decoding = await decode(engine, mc, args, tokens)
    encoder = encoder_seconds(folder, mc, args, torch.device("cuda"))
    for row, alone in zip(prefills, encoder):
        row |= alone
        row["encoder_share"] = alone["encode_s"] / row["image_s"]
        row["encoder_matmul_fraction"] = row["encoder_tflop"] * 1e12 / alone["encode_s"] / args.flops
    shutil.rmtree(folder, ignore_errors=True)
    decoding["text_model_tpot_s"] = await text_model_tpot(args, tokens)
    decoding["vs_text"] = decoding["tpot_s"] / decoding["text_tpot_s"]
    decoding["vs_text_model"] = decoding["tpot_s"] / decoding["text_model_tpot_s"]
    return {
        "benchmark": "vision",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model_config": args.config,
        "text_model_config": args.text_config,
        "model": model_summary(mc, "bfloat16"),
        **git_info(),
        "timestamp": now(),
        "ceilings": {"bf16_matmul_flops": args.flops},
        "image": {
            "size": args.image_size,
            "patches": args.patches,
            "tokens": args.patches // 4,
            "preprocess_s": preprocess_s,
        },
        "prefill": prefills,
        "decode": decoding,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIGS / "qwen2.5-vl-7b.json"), help="the vision-language model")
    parser.add_argument("--text-config", default=str(CONFIGS / "qwen2.5-7b.json"), help="its text-only language model")
    parser.add_argument("--image-size", type=int, default=1024, help="pixels a side (default: 1024)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="requests at once (default: 1 8 32)"
    )
    parser.add_argument("--decode-batch", type=int, default=8, help="requests decoding at once (default: 8)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens each decodes (default: 128)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=16384, help="the step's token budget (default: 16384)"
    )
    parser.add_argument("--out", default=None, help="the JSON report (default: bench/results/vision-<gpu>.json)")
    return parser.parse_args(argv)


def print_table(report: dict) -> None:
    print(f"{'batch':>5} {'images/s':>9} {'vision share':>13} {'encoder share':>14} {'encoder/bf16 peak':>18}")
    for r in report["prefill"]:
        print(
            f"{r['batch']:>5} {r['images_per_s']:>9.2f} {r['vision_share']:>13.1%} {r['encoder_share']:>14.1%} "
            f"{r['encoder_matmul_fraction']:>18.1%}"
        )
    d = report["decode"]
    print(
        f"decode batch {d['batch']}: TPOT {d['tpot_s'] * 1e3:.2f} ms, vs_text {d['vs_text']:.3f}, vs_text_model {d['vs_text_model']:.3f}"
    )


if __name__ == "__main__":
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/vision.py needs a CUDA GPU")
    report = asyncio.run(main(args))
    write_report(report, "vision", report["device"], args.out)
    print_table(report)
