"""Proof of sampling on real models: honest false rejections, forgery detection per token, and cost.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sampling_check.py                     # tiny + SmolLM2, 1000 each
    HF_HUB_OFFLINE=1 .venv/bin/python bench/sampling_check.py --sampling 0.7:0.9  # + a T=0.7, top-p 0.9 run
    HF_HUB_OFFLINE=1 .venv/bin/python bench/sampling_check.py --models tiny --completions 64   # quick
    HF_HUB_OFFLINE=1 .venv/bin/python bench/sampling_check.py --models smollm2 --completions 64 --sample-dtype bfloat16

For each model, honest completions are sampled in groups of G = 8 over distinct prompts (arithmetic
for the tiny random model, GSM8K questions with the chat template for SmolLM2-135M-Instruct) with
the run's keyed noise (``node.noise.group_keys`` for a fresh node identity), wrapped in RewardProofs,
and recomputed by ``node.proving.make_logprob_fn(..., run_seed=...)`` exactly as the verifier
spot-checks them (one teacher-forced forward of prompt + completion, noise, shortfalls). Prints ONE
JSON line with, per run (model x sampling setting):

* ``honest`` — completions and tokens checked; rejections at the default tolerances, rule by rule
  (``sampling_tolerance`` from coordinator/config.py, ``spot_check_mean_abs`` / ``spot_check_max_abs``
  from ``VerifierPolicy``), measured, not assumed; max and 99.9th percentile of the honest shortfall
  and of |Δ log-prob| (sampling-time against recomputed), and how many positions' recomputed argmax
  differs from the sampled token;
* ``forgery`` — at every honest position, the gap between the best and the second-best perturbed
  score ``lp + g`` (recomputed). A cheater who swaps in the runner-up token (the most favourable
  single-token forgery) passes that position when the gap is within the tolerance, so
  ``runner_up_pass[tol]`` is the fraction of positions with gap <= tol and ``1 - that`` the
  detection probability per forged token; ``random_token_detected[tol]`` is the same for a token
  drawn uniformly from the others (shortfall > tol);
* ``timing`` — sampling time per completion (G = 8, ``--batch-prompts`` prompts per generate call)
  against one recomputation per completion (the verifier's call: forward + noise + shortfalls), on
  CPU with ``torch.set_num_threads(--threads)`` (on a CPU shared with other jobs ``--threads 1`` is
  steadier: two threads waiting on each other's barriers made a SmolLM2 forward 6x slower there).

The forgery statistics read the verifier's own forward: a hook on the LM head keeps the logits of
the ``make_logprob_fn`` call (checked: they give back exactly the log-probabilities it returned).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from grpo_swarm.coordinator.config import SwarmSettings  # noqa: E402
from grpo_swarm.node import proving  # noqa: E402
from grpo_swarm.node.data import arithmetic_examples, load_gsm8k, render_prompt  # noqa: E402
from grpo_swarm.node.models import load_model  # noqa: E402
from grpo_swarm.node.noise import completion_noise, group_keys  # noqa: E402
from grpo_swarm.node.rollout import SamplingParams, TransformersBackend, eos_and_pad_ids, processed_logprobs  # noqa: E402
from grpo_swarm.protocol.identity import Identity  # noqa: E402
from grpo_swarm.protocol.proofs import RewardProof, build_reward_proof  # noqa: E402
from grpo_swarm.protocol.sampling_noise import row_key  # noqa: E402
from grpo_swarm.protocol.verify import VerifierPolicy  # noqa: E402

G = 8
ROUND = 0
TOLERANCES = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5)
DEFAULT_LENGTH = {"tiny": 16, "smollm2": 32}


@dataclass(frozen=True)
class Tolerances:
    """The verifier's defaults: a completion is rejected when any rule fails."""

    sampling: float
    mean_abs: float
    max_abs: float

    @classmethod
    def defaults(cls) -> Tolerances:
        policy = VerifierPolicy(reward_specs=[{"name": "a"}], max_completion_tokens=1)
        return cls(sampling=SwarmSettings.model_fields["sampling_tolerance"].default,
                   mean_abs=policy.spot_check_mean_abs, max_abs=policy.spot_check_max_abs)


@dataclass
class Task:
    """A model with its prompts, as the trainer renders them."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    examples: list  # PromptExample, indices unique: the proofs' prompt_index
    use_chat_template: bool | None


@dataclass
class Checked:
    """One completion after the verifier's recomputation, and what the bench derives from it."""

    recompute_s: float
    deltas: np.ndarray  # |Δ log-prob| per token
    shortfalls: np.ndarray  # the verifier's shortfalls
    gaps: np.ndarray  # best - second-best perturbed score per position (inf: no runner-up in the nucleus)
    random_shortfalls: np.ndarray  # shortfall of a uniformly drawn other token per position
    argmax_flips: int  # positions whose recomputed argmax is not the sampled token
    logits_match: bool  # the hooked logits give back exactly the log-probs the verifier returned


# ---- models and prompts ---------------------------------------------------------------------------
def load_task(name: str, prompts: int, seed: int) -> Task:
    """The model and ``prompts`` distinct prompts: arithmetic for tiny, GSM8K (chat template) otherwise."""
    loaded = load_model(name)
    model = loaded.model.eval()
    if name == "tiny" or name.startswith("tiny:"):
        return Task(name, model, loaded.tokenizer, arithmetic_examples(prompts, seed=seed, max_operand=99), None)
    dataset = load_gsm8k(split="train")
    chosen = sorted(random.Random(seed).sample(range(len(dataset)), min(prompts, len(dataset))))
    return Task(name, model, loaded.tokenizer, [dataset[i] for i in chosen], True)


def prompt_token_ids(task: Task) -> list[list[int]]:
    return [task.tokenizer(render_prompt(task.tokenizer, ex, task.use_chat_template), add_special_tokens=False)
            .input_ids for ex in task.examples]


# ---- honest sampling ------------------------------------------------------------------------------
def sample_proofs(task: Task, params: SamplingParams, run_seed: int, node: Identity,
                  batch_prompts: int, sample_dtype: str = "float32") -> tuple[list[RewardProof], float]:
    """G completions of every prompt under the run's keyed noise, as proofs; and the sampling time.
    ``sample_dtype`` other than float32: sampled under CPU autocast to that dtype, as a node with
    ``model.dtype`` bfloat16/float16 samples under autocast (a CPU stand-in for a GPU's kernels)."""
    amp = (torch.autocast("cpu", dtype=getattr(torch, sample_dtype)) if sample_dtype != "float32"
           else contextlib.nullcontext())
    eos, pad = eos_and_pad_ids(task.model, task.tokenizer)
    backend = TransformersBackend(task.model, eos, pad)
    ids = prompt_token_ids(task)
    backend.generate(ids[:1], 1, SamplingParams(max_new_tokens=2), seed=0)  # warm-up
    proofs, seconds = [], 0.0
    for start in range(0, len(ids), batch_prompts):
        examples = task.examples[start : start + batch_prompts]
        keys = group_keys(run_seed, node.node_id, ROUND, [ex.index for ex in examples], G)
        t0 = time.perf_counter()
        with amp:
            batch = backend.generate(ids[start : start + batch_prompts], G, params, seed=0, noise_keys=keys)
        seconds += time.perf_counter() - t0
        for row, completion in enumerate(batch.completion_lists()):
            proofs.append(honest_proof(examples[row // G].index, row % G, completion,
                                       batch.behaviour_logps[row, : len(completion)].tolist(), node))
    return proofs, seconds


def honest_proof(prompt_index: int, member: int, completion: list[int], logprobs: list[float],
                 node: Identity) -> RewardProof:
    """The fields of a RewardProof the spot-check reads (rewards and hashes are placeholders)."""
    return build_reward_proof(
        run_id="bench", policy_version=0, snapshot_sha256=bytes(32), round_index=ROUND, prompt_index=prompt_index,
        prompt_sha256=bytes(32), group_id=f"{prompt_index}", group_size=G, completion_index=member,
        completion_token_ids=completion, completion_text="", behaviour_logprobs=logprobs, rewards=[("a", 0.0)],
        reward_total=0.0, reward_spec_id="s", advantage=0.0, sequence=prompt_index * G + member,
        node_public_key=node.public_key_bytes)


# ---- the verifier's recomputation, and the margins it sees -----------------------------------------
class LogitsTap:
    """Keeps the output of the model's LM head during the block (the verifier's own forward)."""

    def __init__(self, model: torch.nn.Module):
        self.head, self.logits = model.get_output_embeddings(), None

    def __enter__(self) -> LogitsTap:
        self.handle = self.head.register_forward_hook(lambda _m, _in, out: setattr(self, "logits", out.detach()))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def check_completion(fn, task: Task, proof: RewardProof, params: SamplingParams, run_seed: int, node: Identity,
                     gen: torch.Generator) -> Checked:
    """Run the verifier's recomputation on one proof (timed) and derive the margins from its logits."""
    with LogitsTap(task.model) as tap:
        t0 = time.perf_counter()
        got = fn(proof)
        seconds = time.perf_counter() - t0
    tokens = torch.tensor(list(proof.completion_token_ids), dtype=torch.long)
    n = len(tokens)
    logps = processed_logprobs(tap.logits[0, -(n + 1) : -1], params)
    recomputed = logps.gather(1, tokens[:, None]).squeeze(1)
    key = row_key(run_seed, node.node_id, proof.round_index, proof.prompt_index, proof.completion_index)
    scores = logps + completion_noise(key, n, logps.size(-1))
    gaps, random_shortfalls = margins(scores, gen)
    claimed = np.asarray(proof.behaviour_logprobs, dtype=np.float64)
    return Checked(
        recompute_s=seconds,
        deltas=np.abs(np.asarray(got.logprobs, dtype=np.float64) - claimed),
        shortfalls=np.asarray(got.shortfalls, dtype=np.float64),
        gaps=gaps, random_shortfalls=random_shortfalls,
        argmax_flips=int((scores.argmax(dim=1) != tokens).sum()),
        logits_match=recomputed.tolist() == list(got.logprobs))


def margins(scores: torch.Tensor, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per position of perturbed scores [n, V]: best - second best, and best - a uniform other token's
    score (other than the best: at honest positions the best is the sampled token)."""
    top = scores.topk(2, dim=1)
    gaps = (top.values[:, 0] - top.values[:, 1]).double()
    other = torch.randint(0, scores.size(1) - 1, (scores.size(0),), generator=gen)
    other += (other >= top.indices[:, 0]).long()  # skip the best
    random_shortfalls = (top.values[:, 0] - scores.gather(1, other[:, None]).squeeze(1)).double()
    return gaps.numpy(), random_shortfalls.numpy()


# ---- summaries --------------------------------------------------------------------------------------
def failed_rules(c: Checked, tol: Tolerances) -> tuple[bool, bool, bool]:
    """(sampling, mean |Δ|, max |Δ|) rules the completion fails, written as verify.py writes them
    (``not x <= tol``: NaN fails)."""
    return (not float(c.shortfalls.max()) <= tol.sampling,
            not math.fsum(c.deltas) / len(c.deltas) <= tol.mean_abs,
            not float(c.deltas.max()) <= tol.max_abs)


def rejections(checked: list[Checked], tol: Tolerances) -> dict:
    """Completions the verifier's rules reject, in all and rule by rule."""
    fails = [failed_rules(c, tol) for c in checked]
    return {"rejected": sum(any(f) for f in fails), "sampling": sum(f[0] for f in fails),
            "logprob_mean": sum(f[1] for f in fails), "logprob_max": sum(f[2] for f in fails)}


def finite_or_none(x) -> float | None:
    """JSON has no infinity: None stands for it (a gap with no runner-up inside the top-p nucleus)."""
    return float(x) if math.isfinite(x) else None


def tail(values: np.ndarray) -> dict:
    return {"max": float(values.max()), "p99_9": float(np.quantile(values, 0.999)), "mean": float(values.mean())}


def honest_summary(checked: list[Checked], tol: Tolerances) -> dict:
    shortfalls = np.concatenate([c.shortfalls for c in checked])
    deltas = np.concatenate([c.deltas for c in checked])
    return {
        "completions": len(checked), "tokens": int(deltas.size),
        "rejections": rejections(checked, tol),
        "shortfall": {**tail(shortfalls), "positions_nonzero": int((shortfalls != 0).sum())},
        "abs_delta_logprob": {**tail(deltas), "completion_mean_max": max(float(c.deltas.mean()) for c in checked)},
        "argmax_flips": sum(c.argmax_flips for c in checked),
        "verifier_logits_match": all(c.logits_match for c in checked),
    }


def forgery_summary(checked: list[Checked]) -> dict:
    gaps = np.concatenate([c.gaps for c in checked])
    rand = np.concatenate([c.random_shortfalls for c in checked])
    finite = gaps[np.isfinite(gaps)]
    return {
        "positions": int(gaps.size),
        "runner_up_pass": {f"{t:g}": float((gaps <= t).mean()) for t in TOLERANCES},
        "runner_up_detected": {f"{t:g}": float((gaps > t).mean()) for t in TOLERANCES},
        "random_token_detected": {f"{t:g}": float((rand > t).mean()) for t in TOLERANCES},
        "gap_min": float(gaps.min()),
        "gap_median": finite_or_none(np.median(gaps)),
        "no_runner_up_in_nucleus": float(1 - finite.size / gaps.size),
    }


def timing_summary(checked: list[Checked], sampling_s: float) -> dict:
    per_completion = sampling_s / len(checked)
    times = [c.recompute_s for c in checked]
    return {
        "sample_per_completion_s": round(per_completion, 5),
        "recompute_per_completion_s": round(statistics.fmean(times), 5),
        "recompute_median_s": round(statistics.median(times), 5),
        "recompute_over_sample": round(statistics.fmean(times) / per_completion, 3),
    }


# ---- one run -----------------------------------------------------------------------------------------
def run(task: Task, params: SamplingParams, completions: int, batch_prompts: int, run_seed: int, seed: int,
        tol: Tolerances, sample_dtype: str = "float32") -> dict:
    node = Identity.generate()
    prompts = -(-completions // G)
    sub = Task(task.name, task.model, task.tokenizer, task.examples[:prompts], task.use_chat_template)
    proofs, sampling_s = sample_proofs(sub, params, run_seed, node, batch_prompts, sample_dtype)
    fn = proving.make_logprob_fn(task.model, task.tokenizer, sub.examples, temperature=params.temperature,
                                 top_p=params.top_p, top_k=params.top_k, use_chat_template=task.use_chat_template,
                                 run_seed=run_seed)
    fn(proofs[0])  # warm-up
    gen = torch.Generator().manual_seed(seed)
    checked = [check_completion(fn, task, p, params, run_seed, node, gen) for p in proofs]
    return {
        "model": task.name, "temperature": params.temperature, "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens, "group_size": G, "prompts": prompts, "sample_dtype": sample_dtype,
        "mean_completion_tokens": round(statistics.fmean(len(p.completion_token_ids) for p in proofs), 2),
        "honest": honest_summary(checked, tol),
        "forgery": forgery_summary(checked),
        "timing": timing_summary(checked, sampling_s),
    }


def parse_sampling(spec: str) -> list[tuple[float, float]]:
    """``"0.7:0.9,0.5:1"`` -> [(0.7, 0.9), (0.5, 1.0)] (temperature, top_p)."""
    return [tuple(float(x) for x in item.split(":")) for item in spec.split(",") if item.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--completions", type=int, default=1000, help="honest completions per model at T=1, top-p 1")
    ap.add_argument("--length", type=int, default=None, help="max new tokens (default: 16 tiny, 32 SmolLM2)")
    ap.add_argument("--sampling", default="", help="extra settings TEMP:TOP_P[,...], each run per model")
    ap.add_argument("--sampling-completions", type=int, default=256, help="completions per extra setting")
    ap.add_argument("--batch-prompts", type=int, default=4, help="prompts (x G) per generate call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-seed", type=int, default=20240601)
    ap.add_argument("--seed", type=int, default=0, help="prompt choice and the random other tokens")
    ap.add_argument("--sample-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="sample under CPU autocast to this dtype, as nodes with model.dtype bfloat16 did before "
                         "session 36 (a CPU stand-in for a GPU's bf16 kernels); the check stays float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tol = Tolerances.defaults()
    extra = parse_sampling(args.sampling)
    out = {"bench": "sampling_check", "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2),
           "tolerances": {"sampling": tol.sampling, "logprob_mean_abs": tol.mean_abs, "logprob_max_abs": tol.max_abs},
           "runs": []}
    t0 = time.perf_counter()
    for name in [m for m in args.models.split(",") if m]:
        length = args.length or DEFAULT_LENGTH.get(name, 32)
        settings = [(1.0, 1.0, args.completions)] + [(t, p, args.sampling_completions) for t, p in extra]
        task = load_task(name, -(-max(n for _, _, n in settings) // G), args.seed)
        for temperature, top_p, n in settings:
            params = SamplingParams(max_new_tokens=length, temperature=temperature, top_p=top_p)
            out["runs"].append(run(task, params, n, args.batch_prompts, args.run_seed, args.seed, tol,
                                   args.sample_dtype))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
