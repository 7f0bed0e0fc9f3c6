"""How well the share audit catches a wrong average, how often it blames an honest one, what it costs.

Offline (no network): three senders' gradients with hivemind's real partition and compression, the
honest average rounded as the reducer sends it, then the audit's check (node/swarm/share_sketch.py)
under fresh secret projections:

* honest rejections over ``--trials`` projections per compression (must be 0);
* detection rate of a reducer that changes its share by a fraction of its norm, spread over every
  value (alternating sign) or put on one value, for each fraction in ``--fractions``, with the
  audit reading ``--audit-fraction`` of the rows (default: the averager's; a one-value change is
  then caught about that often, in the audits whose secret rows include it);
* the cost: seconds to sketch one SmolLM2-135M-sized gradient (134.5M values) at that fraction and
  reading every row — a member sketches its inputs and every average once per round, a reducer
  also the parts it received.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import Float16Compression, NoCompression

from grpo_swarm.node.swarm.share_sketch import (
    DEFAULT_AUDIT_FRACTION,
    Projection,
    ShareLayout,
    always_audited,
    flat_views,
    share_residual,
    share_tolerance,
    sketch_share,
)

SHAPES = [(49152, 64), (576,), (1536, 576), (576, 1536), (4096,)]
WEIGHTS = [3.0, 5.0, 7.0]
SMOLLM2_VALUES = 134_515_008


def world(compression):
    torch.manual_seed(0)
    xs = [[0.01 * torch.randn(s) for s in SHAPES] for _ in WEIGHTS]
    part = 2 ** 19
    container = TensorPartContainer(xs[0], [1.0] * len(WEIGHTS), compression=compression, part_size_bytes=part)
    layout = ShareLayout.from_partition([[p.numel() for p, _ in ps] for ps in container._input_parts_by_peer],
                                        container.num_parts_by_tensor)
    fp16 = isinstance(compression, Float16Compression)
    sent = [[x.half().float() for x in xs_i] if fp16 else xs_i for xs_i in xs]  # what reducers add up
    avg = [sum(w * s[t] for w, s in zip(WEIGHTS, sent)) / sum(WEIGHTS) for t in range(len(SHAPES))]
    if fp16:
        avg = [a.half().float() for a in avg]
    norms = [float(torch.cat([t.reshape(-1) for t in x]).norm()) for x in xs]
    return sent, avg, layout, norms, fp16


def share_norm(layout, j, flat):
    return math.sqrt(sum(float(flat[s.tensor_index][s.start: s.start + s.numel].double().pow(2).sum())
                         for s in layout.spans[j]))


def run(trials: int, fractions: list[float], audit_fraction: float) -> dict:
    out: dict = {}
    for name, compression in (("none", NoCompression()), ("fp16", Float16Compression())):
        sent, avg, layout, norms, fp16 = world(compression)
        j = 1
        flat_avg = flat_views(avg)
        n_out = share_norm(layout, j, flat_avg)
        numel = layout.numel(j)
        span = layout.spans[j][0]
        worst_honest, rejected = 0.0, 0
        caught = {f"{kind}_{f:g}": 0 for kind in ("dense", "one_value") for f in fractions}
        for trial in range(trials):
            proj = Projection.draw(trial.to_bytes(8, "big"), j, layout.rows[j], fraction=audit_fraction,
                                   always=always_audited(layout, j))
            ins = [sketch_share(layout, j, flat_views(x), proj) for x in sent]
            tol = share_tolerance(n_out, WEIGHTS, norms, numel, fp16_output=fp16)
            honest = float(np.max(np.abs(share_residual(sketch_share(layout, j, flat_avg, proj), ins, WEIGHTS))))
            worst_honest = max(worst_honest, honest / tol)
            rejected += honest > tol
            for f in fractions:
                for kind in ("dense", "one_value"):
                    bad = [a.clone() for a in avg]
                    fb = flat_views(bad)
                    if kind == "dense":
                        for s in layout.spans[j]:
                            seg = fb[s.tensor_index][s.start: s.start + s.numel]
                            sign = torch.ones_like(seg)
                            sign[1::2] = -1
                            seg += f * n_out / math.sqrt(numel) * sign
                    else:
                        fb[span.tensor_index][span.start + 12345 % span.numel] += f * n_out
                    residual = share_residual(sketch_share(layout, j, fb, proj), ins, WEIGHTS)
                    caught[f"{kind}_{f:g}"] += float(np.max(np.abs(residual))) > tol
        out[name] = dict(honest_rejections=rejected, worst_honest_over_tolerance=round(worst_honest, 4),
                         detection={k: v / trials for k, v in caught.items()}, share_values=numel)
    x = torch.randn(SMOLLM2_VALUES // 1024 * 1024)
    layout = ShareLayout.from_partition([[131072] * (x.numel() // 131072) + [x.numel() % 131072]],
                                        [x.numel() // 131072 + 1])
    sampled = Projection.draw(b"cost", 0, layout.rows[0], fraction=audit_fraction, always=always_audited(layout, 0))
    full = Projection(sampled.U, sampled.V)
    times: dict[str, list[float]] = {"sampled": [], "full": []}
    for _ in range(3):  # alternated
        for name, proj in (("sampled", sampled), ("full", full)):
            t = time.perf_counter()
            sketch_share(layout, 0, [x], proj)
            times[name].append(time.perf_counter() - t)
    t = time.perf_counter()
    x.sum()
    read = time.perf_counter() - t
    out["sketch_s_per_smollm2_gradient"] = round(sorted(times["sampled"])[1], 4)
    out["sketch_s_every_row"] = round(sorted(times["full"])[1], 4)
    out["sketch_cost_vs_every_row"] = round(sorted(times["sampled"])[1] / sorted(times["full"])[1], 3)
    out["sum_s_same_tensor"] = round(read, 4)
    out["trials"] = trials
    out["audit_fraction"] = audit_fraction
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03])
    ap.add_argument("--audit-fraction", type=float, default=DEFAULT_AUDIT_FRACTION,
                    help="share of the rows the audit reads (1: every row)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(json.dumps(run(args.trials, args.fractions, args.audit_fraction)))


if __name__ == "__main__":
    main()
