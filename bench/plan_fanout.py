"""What it costs the scheduler to send each step's plan to N tensor-parallel ranks.

The engine sends a plan's bytes, encoded once, down one ZMQ PUSH socket per rank
(``ipc://``). This measures that, and a PUB socket with N subscribers for comparison,
for two plans: a steady batch-256 decode step (a diff with no rows) and a step that
admits 8 prompts of 2048 tokens. Each rank is its own process. Figures: the sender's
time per step (encode and send), and the time from sending until the last rank has
decoded the plan, as medians over ``--steps`` steps sent ``--gap-us`` apart.

    python bench/plan_fanout.py --ranks 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import statistics
import tempfile
import time

import zmq

from tristream.bench.report import RESULTS, header, now
from tristream.plan_codec import PlanEncoder
from tristream.protocol import BatchPlan, NewSequence, decode, encode
from tristream.sampling_params import SamplingParams


def plans(kind: str) -> list[BatchPlan]:
    """Two plans of a kind; the second is the one measured (the first sets the encoder's decode rows)."""
    if kind == "decode-256":
        rows = list(range(256))
        return [BatchPlan(i, slots=rows, num_tokens=[1] * 256, sample=[True] * 256) for i in range(2)]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256)
    new = [NewSequence(slot, list(range(1000, 3048)), 0, 0, params) for slot in range(8)]
    pages = [(slot, list(range(1 + 128 * slot, 1 + 128 * (slot + 1)))) for slot in range(8)]
    return [
        BatchPlan(0),
        BatchPlan(1, new=new, pages=pages, slots=list(range(8)), num_tokens=[1024] * 8, sample=[False] * 8),
    ]


def receiver(mode: str, address: str, steps: int, results: mp.Queue, ready: mp.Queue) -> None:
    ctx = zmq.Context()
    if mode == "push":
        sock = ctx.socket(zmq.PULL)
        sock.bind(address)
    else:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(address)
    ready.put(True)
    arrived = []
    while len(arrived) < steps:
        msg = decode(sock.recv(copy=False).buffer)
        if msg is None:
            continue
        arrived.append(time.monotonic() - msg.plan.sent_at)
    results.put(arrived)


def measure(mode: str, ranks: int, kind: str, steps: int, gap_s: float) -> dict:
    folder = tempfile.mkdtemp(prefix="tristream-fanout-")
    ctx = zmq.Context()
    mpctx = mp.get_context("spawn")
    results, ready = mpctx.Queue(), mpctx.Queue()
    if mode == "push":
        addresses = [f"ipc://{os.path.join(folder, f'gpu{r}')}" for r in range(ranks)]
        procs = [mpctx.Process(target=receiver, args=(mode, a, steps, results, ready)) for a in addresses]
    else:
        address = f"ipc://{os.path.join(folder, 'plans')}"
        procs = [mpctx.Process(target=receiver, args=(mode, address, steps, results, ready)) for _ in range(ranks)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    if mode == "push":
        socks = []
        for a in addresses:
            sock = ctx.socket(zmq.PUSH)
            sock.connect(a)
            socks.append(sock)
    else:
        pub = ctx.socket(zmq.PUB)
        pub.bind(address)
        socks = [pub]
        # Subscribers that joined late miss messages: send no-ops until every one has had time to connect.
        for _ in range(50):
            pub.send(encode(None))
            time.sleep(0.01)
    encoder = PlanEncoder()
    first, plan = plans(kind)
    encoder.diff(first)
    size = len(encode(encoder.diff(plan)))
    send_s = []
    for _ in range(steps):
        start = time.perf_counter()
        plan.sent_at = time.monotonic()
        data = encode(encoder.diff(plan))
        for sock in socks:
            sock.send(data, copy=False)
        send_s.append(time.perf_counter() - start)
        time.sleep(gap_s)
    arrivals = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    ctx.destroy(linger=0)
    last = [max(step) for step in zip(*arrivals)]
    return {
        "mode": mode,
        "ranks": ranks,
        "plan": kind,
        "bytes": size,
        "send_us_p50": 1e6 * statistics.median(send_s),
        "to_last_rank_us_p50": 1e6 * statistics.median(last),
        "to_last_rank_us_p99": 1e6 * statistics.quantiles(last, n=100)[98],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--gap-us", type=float, default=500.0)
    parser.add_argument("--out", default=str(RESULTS / "plan_fanout.json"))
    args = parser.parse_args()
    started = now()
    rows = []
    for kind in ("decode-256", "prefill-8x2048"):
        for mode in ("push", "pub"):
            for ranks in args.ranks:
                r = measure(mode, ranks, kind, args.steps, args.gap_us / 1e6)
                rows.append(r)
                print(
                    f"{kind:15s} {mode:4s} x{ranks}: {r['bytes']:7d} B, send {r['send_us_p50']:6.1f} us, "
                    f"to the last rank p50 {r['to_last_rank_us_p50']:6.1f} us, p99 {r['to_last_rank_us_p99']:7.1f} us",
                    flush=True,
                )
    report = {**header("plan_fanout", started), "steps": args.steps, "gap_us": args.gap_us, "results": rows}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
