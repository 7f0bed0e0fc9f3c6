"""The cost of proof of sampling in the sampler: generation with the run's keyed noise
(:class:`grpo_swarm.node.noise.KeyedNoise`, integer hash + two logs per vocabulary entry) against
the sampler it replaced (Gumbel noise from ``torch.rand``, drawn in the same blocks), same model,
prompts and settings, interleaved run by run in one process.

    python bench/sampler_noise.py                    # tiny (4 x G=8 x 16 tokens) and SmolLM2 (2 x 8 x 64)
    python bench/sampler_noise.py --models tiny

Prints ONE JSON line: per model the median generation time with each noise source and
``keyed_over_rand`` (< 1.03 is the target: the node's sampling may not get more than 3 % slower).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from grpo_swarm.node import rollout  # noqa: E402
from grpo_swarm.node.data import arithmetic_examples, load_dataset_spec, render_prompt  # noqa: E402
from grpo_swarm.node.models import load_model  # noqa: E402
from grpo_swarm.node.noise import KeyedNoise  # noqa: E402

PRESETS = {"tiny": dict(prompts=4, group_size=8, tokens=16, runs=30),
           "smollm2": dict(prompts=2, group_size=8, tokens=64, runs=5)}


class RandNoise:
    """The previous sampler's noise: -log(-log U), U from torch.rand, in blocks of several steps."""

    def __init__(self, keys: torch.Tensor, vocab: int, steps: int, budget: int = 1 << 22):
        self.generator = torch.Generator(device=keys.device).manual_seed(int(keys[0, 0]))
        self.all_rows, self.vocab, self.steps, self.budget = keys.size(0), vocab, steps, budget
        self.block, self.first, self.rows = None, 0, None

    def at(self, step: int, active):
        if self.block is None or active is not self.rows or step - self.first >= self.block.size(0):
            n = self.all_rows if active is None else active.numel()
            count = max(1, min(self.steps - step, self.budget // max(1, n * self.vocab)))
            u = torch.rand((count, n, self.vocab), generator=self.generator)
            self.block = u.log_().neg_().log_().neg_()
            self.first, self.rows = step, active
        return self.block[step - self.first]


def prompts_for(name: str, tokenizer, count: int) -> list[list[int]]:
    if name == "tiny":
        examples = arithmetic_examples(count, seed=0)
        texts = [render_prompt(tokenizer, ex, use_chat_template=False) for ex in examples]
    else:
        examples = load_dataset_spec("gsm8k", split="train", seed=0, size=count)[:count]
        texts = [render_prompt(tokenizer, ex, use_chat_template=True) for ex in examples]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def measure(name: str, runs: int | None) -> dict:
    preset = PRESETS[name]
    loaded = load_model(name)
    eos, pad = rollout.eos_and_pad_ids(loaded.model, loaded.tokenizer)
    backend = rollout.TransformersBackend(loaded.model, eos, pad)
    prompts = prompts_for(name, loaded.tokenizer, preset["prompts"])
    params = rollout.SamplingParams(max_new_tokens=preset["tokens"])
    times: dict[str, list[float]] = {"keyed": [], "rand": []}
    tokens: dict[str, list[int]] = {"keyed": [], "rand": []}
    sources = {"keyed": KeyedNoise, "rand": RandNoise}
    for i in range(-1, runs or preset["runs"]):  # run -1 warms up both
        for label in ("keyed", "rand") if i % 2 else ("rand", "keyed"):
            rollout.KeyedNoise = sources[label]
            t0 = time.perf_counter()
            batch = backend.generate(prompts, preset["group_size"], params, seed=i + 7)
            dt = time.perf_counter() - t0
            if i >= 0:
                times[label].append(dt)
                tokens[label].append(int(batch.completion_mask.sum()))
    rollout.KeyedNoise = KeyedNoise
    # tokens per second, so runs that happen to sample longer completions do not count as slower
    rate = {k: statistics.median(n / t for n, t in zip(tokens[k], times[k])) for k in times}
    return {"runs": len(times["keyed"]), "keyed_median_s": round(statistics.median(times["keyed"]), 4),
            "rand_median_s": round(statistics.median(times["rand"]), 4),
            "keyed_tokens_per_s": round(rate["keyed"], 1), "rand_tokens_per_s": round(rate["rand"], 1),
            "keyed_over_rand": round(rate["rand"] / rate["keyed"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--runs", type=int, default=None, help="timed generations per noise source")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads}
    for name in args.models.split(","):
        out[name] = measure(name, args.runs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
