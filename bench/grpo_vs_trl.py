"""Throughput of our GRPO step against TRL 1.16's GRPOTrainer, same model, prompts and settings.

    HF_HUB_OFFLINE=1 python bench/grpo_vs_trl.py --model tiny|smollm2 [--steps N] [--warmup 1]
        [--group-size G] [--prompts P] [--max-completion-length L] [--loss-type grpo] [--beta 0]
        [--threads 2] [--dataset arithmetic|gsm8k] [--temperature 1] [--epsilon 0.2] [--lr 1e-6] [--seed 0]

Prints exactly one JSON line on stdout (everything else goes to stderr, with a human-readable table)::

    {"model", "ours_completions_per_s", "trl_completions_per_s", "ratio", "max_abs_grad_diff", "config", ...}

What runs
---------
* One model is loaded (``tiny``: the random tiny Qwen2 with a character tokenizer; ``smollm2``: SmolLM2-135M-Instruct
  from the offline GGUF file). Our trainer (:class:`grpo_swarm.node.trainer.GRPOTrainer`) and TRL's get deep copies
  of the same initial weights; both run on the CPU in fp32.
* Prompt batches are drawn once (:class:`PromptSampler`, seeded); step ``i`` of both trainers gets the same batch.
  Prompts are rendered with :func:`grpo_swarm.node.data.render_prompt` (the tokenizer's chat template when it has one,
  e.g. SmolLM2 on GSM8K) and TRL receives that rendered text, so both models see the same prompt tokens: this is
  checked for every batch by comparing our token ids with those TRL's own ``_tokenize_prompts`` produces.
  The reward function is ours, unmodified (``arithmetic_accuracy`` / ``gsm8k_accuracy``, with the ``answer`` column).
* The steps alternate ours / TRL. Each is one full optimisation step: generation + scoring + gradient + optimizer
  step. TRL's step is driven by :class:`trl_compare.TRLStepper`, set up once as ``Trainer.train()`` does (gradient
  checkpointing, optimizer + scheduler, state, callbacks) and stepping as ``_run_epoch`` does.
* ``--warmup`` steps of each run first and are not timed; the ``--steps`` after them are.

Reported
--------
* ``ours_completions_per_s`` / ``trl_completions_per_s``: completions per step (P × G) × timed steps / total wall time
  of those full steps; ``ratio`` = ours / TRL.
* ``max_abs_grad_diff``: before any update, gradients of both implementations on one identical batch — the batch
  of our first step (same rollout seed and weights) — with ``trl_compare.our_gradients`` (our
  ``use_behaviour_correction=False``, as in tests/test_trl_parity.py) and ``trl_compare.trl_gradients`` (TRL's
  ``_compute_loss`` under its training setup, gradient checkpointing on). When every completion of that batch got
  the same reward (all advantages 0, so both gradients are exactly 0 — common with the random tiny model), the
  check uses seeded random rewards instead; ``grad_check.rewards`` says which, ``grad_check.trl_grad_scale`` is
  TRL's largest gradient entry.
* Utilisation (FLOPs counted as in ``bench/flops.py``: ``6·N·tokens + 6·hidden·vocab·logit_rows +
  12·heads·head_dim·attended_pairs`` for training, ``2·…``/``4·…`` for generation and frozen reference passes,
  attention counted causally over the keys each query sees; no recompute from gradient checkpointing, no
  optimizer), divided by a peak measured in the same run: the sustained FLOP/s of an fp32
  ``torch.mm`` of shape [1024, hidden] × [hidden, intermediate] (the model's MLP shape, same thread count) run
  back to back for a second (``flops.matmul_peak``) before the steps and after them, and for half a second before
  and after every step of each trainer. This machine's speed drifts by ±20 % (at times ±40 %) within a run, so two
  figures are reported: ``*_train_utilisation`` against the largest of all those peaks (conservative: a slow
  moment's step against the fastest moment's matmuls), and ``*_train_utilisation_adjacent_peak``, the median over
  the timed steps of each step's training FLOP/s over the mean of the two peaks measured right before and right
  after that step. Then, after the alternating steps, our training phase alone (``compute_gradients`` +
  ``apply_gradients`` on the last step's scored batch) runs ``--utilisation-rounds`` times with a probe of
  ``--probe-seconds`` before the first and after every phase: ``ours_train_utilisation_interleaved`` is the
  median over those phases of each one's FLOP/s over the mean of its two probes (the probes then bracket
  exactly the phase being measured, not a whole step with generation in it). The fastest single run of the loop
  is reported too (``peak_best_rep_flops_per_s``, ~30 % higher
  on this machine: a burst no sustained computation keeps up), with the train utilisations against it
  (``*_train_utilisation_vs_best_rep``). ``minor_page_faults_per_step`` counts first touches of fresh memory
  during each full step (each costs ~3-4 µs in this VM).

  - ``ours_train_flops_per_s`` = our training FLOPs / our ``time_train`` (gradient computation + clip + AdamW),
    counting non-padding tokens only, each prompt once per group: prefix ``p[:-1]`` once per group (its last
    layer only as keys/values) + ``len(c)`` tokens per completion; logits for the completion tokens. ``ours_train_utilisation`` = that / peak.
    ``ours_step_utilisation`` adds generation FLOPs (prompt prefilled once per group + completion tokens fed back,
    non-padding) and β > 0 reference forwards, over the whole step time.
  - TRL: its training phase is timed as the step minus its ``_generate_and_score_completions`` (so both "train"
    phases cover loss forward/backward, clipping and the optimizer step). Its FLOPs are counted the same way on
    the tokens *it processes*: every completion row carries its own prompt, left-padded to the longest prompt
    (P) with completions right-padded to the longest (C): training B × (P + C) body tokens (attention over
    all of them, causally), and LM-head rows
    B × (P + C − 1) on CPU (TRL 1.16's fused LM head projects every position unless it runs with Triton on
    CUDA/XPU, then B × C); generation B × P prefill + B × (C − 1) decode (finished rows keep decoding padding
    until all rows are done), B × C logit rows. ``trl_train_utilisation`` / ``trl_step_utilisation`` use those.
  - ``trl_useful_step_utilisation`` counts TRL's batch the way ours is counted (non-padding, prompt once per
    group) over TRL's step time: the useful work per second, comparable with ``ours_step_utilisation``.
* Sanity checks (in the JSON): identical prompt token ids, TRL generated G completions per prompt each step,
  and whether each trainer's weights moved (they must when some step had a non-zero advantage; with all
  advantages 0 — all rewards equal — a GRPO step with β = 0 leaves the weights unchanged in both).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PRESETS = {
    "tiny": dict(group_size=8, prompts=4, max_completion_length=16, dataset="arithmetic", steps=20,
                 utilisation_rounds=10, probe_seconds=0.25),
    "smollm2": dict(group_size=8, prompts=2, max_completion_length=64, dataset="gsm8k", steps=3,
                    utilisation_rounds=6, probe_seconds=1.0),
}
REQUIRED_KEYS = ("model", "ours_completions_per_s", "trl_completions_per_s", "ratio", "max_abs_grad_diff", "config")
GRAD_CHECK_SEED = 1234
LOSS_NORMALISATION = {  # TRL 1.16 GRPOTrainer._compute_loss, one accumulation step
    "grpo": "mean over each completion's tokens, then mean over completions",
    "bnpo": "sum over the batch's tokens / their count",
    "dr_grpo": "sum over tokens / (completions x max_completion_length)",
    "dapo": "sum over tokens / num_items_in_batch (completion tokens of the generation batch)",
}

log = logging.getLogger("grpo_vs_trl")


def minor_page_faults() -> int:
    """This process's minor page faults so far (first touches of fresh memory: ~3-4 µs each in this VM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_train_utilisation(trainer, batch, flops: float, probe, rounds: int) -> tuple[list[float], list[float]]:
    """Our training phase (``compute_gradients`` + ``apply_gradients``) on one scored batch, ``rounds`` times,
    with a matmul-peak probe before the first and after every round. Returns each round's utilisation (its
    FLOP/s over the mean of the two probes around it) and the probes' sustained FLOP/s."""
    probes = [probe()]
    utilisations = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        trainer.compute_gradients(batch)
        trainer.apply_gradients()
        elapsed = time.perf_counter() - t0
        probes.append(probe())
        utilisations.append(flops / elapsed / ((probes[-2] + probes[-1]) / 2))
    return utilisations, probes


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (tiny: 20, smollm2: 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--group-size", type=int, default=None, help="G (default 8)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (tiny: 4, smollm2: 2)")
    ap.add_argument("--max-completion-length", type=int, default=None, help="L (tiny: 16, smollm2: 64)")
    ap.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--dataset", default=None, help="arithmetic[:MAX[:OPS]] | gsm8k (tiny: arithmetic, smollm2: gsm8k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--utilisation-rounds", type=int, default=None,
                    help="training phases timed between matmul-peak probes after the steps (tiny: 10, smollm2: 6)")
    ap.add_argument("--probe-seconds", type=float, default=None, help="length of each probe (tiny: 0.25, smollm2: 1)")
    args = ap.parse_args(argv)
    preset = PRESETS[args.model]
    for key in ("steps", "group_size", "prompts", "max_completion_length", "dataset", "utilisation_rounds",
                "probe_seconds"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if not (args.dataset == "gsm8k" or args.dataset == "arithmetic" or args.dataset.startswith("arithmetic:")):
        ap.error(f"--dataset must be arithmetic[:MAX[:OPS]] or gsm8k, got {args.dataset!r}")
    return args


def reward_name(dataset: str) -> str:
    return "gsm8k_accuracy" if dataset == "gsm8k" else "arithmetic_accuracy"


# ----------------------------------------------------------------------------------------------------- helpers


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_change(model, before: dict[str, torch.Tensor]) -> float:
    return max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())


def trl_defaults_kept(trl_trainer) -> list[str]:
    """The notable TRL / TrainingArguments defaults this benchmark leaves as they are."""
    a = trl_trainer.args
    gc_kwargs = dict(a.activation_checkpointing_kwargs or {}) or {"use_reentrant": False}
    from trl.kernels.chunked_logprob import _use_triton

    head = "completion positions" if _use_triton(a.device) else "every position (no Triton on this device)"
    return [
        f"gradient_checkpointing={a.activation_checkpointing} (kwargs {gc_kwargs}, enabled as Trainer.train() does)",
        f"loss normalisation: loss_type={a.loss_type!r} ({LOSS_NORMALISATION.get(a.loss_type, 'see TRL')}), "
        f"scale_rewards={a.scale_rewards!r}",
        f"optim={a.optim.value if hasattr(a.optim, 'value') else a.optim} adam_beta1={a.adam_beta1} "
        f"adam_beta2={a.adam_beta2} adam_epsilon={a.adam_epsilon} weight_decay={a.weight_decay}",
        f"lr_scheduler_type={getattr(a.lr_scheduler_type, 'value', a.lr_scheduler_type)} over max_steps = warmup + "
        f"steps, warmup_steps={a.warmup_steps}",
        f"max_grad_norm={a.max_grad_norm}",
        f"generation: transformers model.generate (use_vllm={a.use_vllm}), each prompt repeated G times "
        "(no prefix sharing), left-padded; rows decode until every row is done",
        f"top_p={a.top_p} top_k={a.top_k} min_p={a.min_p} repetition_penalty={a.repetition_penalty}",
        f"steps_per_generation={a.steps_per_generation} gradient_accumulation_steps={a.gradient_accumulation_steps} "
        f"num_iterations={a.num_iterations}",
        f"fused LM head (TRL 1.16) scoring {head}",
        f"mask_truncated_completions={a.mask_truncated_completions} top_entropy_quantile={a.top_entropy_quantile} "
        f"importance_sampling_level={a.importance_sampling_level!r} disable_dropout={a.disable_dropout}",
        f"shuffle_dataset={a.shuffle_dataset} (the benchmark feeds the batches itself; TRL still shuffles rows "
        "within the generation batch)",
    ]


def fmt_rate(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.2f} "


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def print_table(res: dict) -> None:
    def row(name, ours, trl, kind="num"):
        if kind == "flops":
            o, t = fmt_rate(ours) + "FLOP/s", fmt_rate(trl) + "FLOP/s"
        elif kind == "pct":
            o, t = f"{100 * ours:.1f} %", f"{100 * trl:.1f} %"
        elif kind == "s":
            o, t = f"{ours:.3f} s", f"{trl:.3f} s"
        else:
            o, t = f"{ours:.2f}", f"{trl:.2f}"
        ratio = ours / trl if trl else float("nan")
        return f"  {name:<34}{o:>18}{t:>18}{ratio:>10.2f}"

    out = [
        f"GRPO step, ours vs TRL — model {res['model']}, {res['config']['shared']['prompts_per_step']} prompts x "
        f"G={res['config']['shared']['group_size']}, L={res['config']['shared']['max_completion_length']}, "
        f"{res['timed_steps']} timed steps after {res['warmup_steps']} warm-up, {res['threads']} threads",
        f"  {'':<34}{'ours':>18}{'TRL':>18}{'ours/TRL':>10}",
        row("completions / s", res["ours_completions_per_s"], res["trl_completions_per_s"]),
        row("step time (mean)", res["ours_step_s"], res["trl_step_s"], "s"),
        row("  generation + scoring", res["ours_generate_score_s"], res["trl_generate_score_s"], "s"),
        row("  training (grad + optimizer)", res["ours_train_s"], res["trl_train_s"], "s"),
        row("train FLOP/s (own tokens)", res["ours_train_flops_per_s"], res["trl_train_flops_per_s"], "flops"),
        row("train utilisation (largest peak)", res["ours_train_utilisation"], res["trl_train_utilisation"], "pct"),
        row("train utilisation (adjacent peaks)", res["ours_train_utilisation_adjacent_peak"],
            res["trl_train_utilisation_adjacent_peak"], "pct"),
        f"  {'train utilisation (between probes)':<34}{fmt_pct(res['ours_train_utilisation_interleaved']):>18}"
        f"{'(not run)':>18}   median of {len(res['interleaved_rounds']['utilisation'])} training phases",
        row("step utilisation (own tokens)", res["ours_step_utilisation"], res["trl_step_utilisation"], "pct"),
        row("step utilisation (useful tokens)", res["ours_step_utilisation"], res["trl_useful_step_utilisation"],
            "pct"),
        f"  matmul peak {fmt_rate(res['peak_flops_per_s'])}FLOP/s sustained (best single run "
        f"{fmt_rate(res['peak_best_rep_flops_per_s'])}FLOP/s: train utilisation ours "
        f"{res['ours_train_utilisation_vs_best_rep']:.1%}, TRL {res['trl_train_utilisation_vs_best_rep']:.1%}; "
        f"fp32 mm {res['peak_shape']}); "
        f"max |grad diff| {res['max_abs_grad_diff']:.3g} (TRL grad scale {res['grad_check']['trl_grad_scale']:.3g},"
        f" rewards: {res['grad_check']['rewards']})",
        f"  reward mean ours {res['ours_reward_mean']:.3f} / TRL {res['trl_reward_mean']:.3f}; mean completion "
        f"length ours {res['ours_mean_completion_length']:.1f} / TRL {res['trl_mean_completion_length']:.1f}; "
        f"weights moved: ours {res['ours_weights_changed']} / TRL {res['trl_weights_changed']}",
    ]
    print("\n".join(out), file=sys.stderr)


# ----------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    import transformers
    import trl
    from flops import ModelDims, forward_flops, grouped_counts, matmul_peak, train_flops, trl_processed_counts
    from trl.kernels.chunked_logprob import _use_triton
    from trl_compare import (SharedSettings, TRLStepper, clone_model, make_trl_trainer, max_abs_diff,
                             our_gradients, trl_gradients)

    from grpo_swarm.node import grpo
    from grpo_swarm.node.allocator import keep_freed_memory
    from grpo_swarm.node.config import TrainConfig
    from grpo_swarm.node.data import PromptSampler, load_dataset_spec, render_prompt
    from grpo_swarm.node.models import load_model
    from grpo_swarm.node.rewards import build_reward_functions, resolve_reward
    from grpo_swarm.node.training_run import seed_everything
    from grpo_swarm.node.trainer import GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as build_trainer does for a node; process-wide, so TRL runs with it too
    seed_everything(args.seed)
    total_steps = args.warmup + args.steps
    G, P = args.group_size, args.prompts

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model0, tok = loaded.model.to("cpu"), loaded.tokenizer
    log.info("loaded %s in %.1f s", loaded.spec, time.perf_counter() - t0)
    dims = ModelDims.of(model0)

    examples = load_dataset_spec(args.dataset, "train", seed=args.seed)
    sampler = PromptSampler(examples, seed=args.seed)
    batches = [sampler.next_batch(P) for _ in range(total_steps)]

    shared = SharedSettings(group_size=G, prompts_per_step=P, max_completion_length=args.max_completion_length,
                            temperature=args.temperature, loss_type=args.loss_type, beta=args.beta,
                            epsilon=args.epsilon, lr=args.lr)
    reward = reward_name(args.dataset)
    cfg_data = {
        "model": {"name": args.model, "device": "cpu"},
        "data": {"dataset": args.dataset},
        "rewards": [{"name": reward}],
        "grpo": {"group_size": G, "prompts_per_step": P, "max_completion_length": args.max_completion_length,
                 "temperature": args.temperature, "loss_type": args.loss_type, "beta": args.beta,
                 "epsilon": args.epsilon, "epsilon_high": shared.epsilon_high, "delta": shared.delta},
        "optim": {"lr": args.lr},
        "run": {"seed": args.seed, "threads": args.threads, "steps": total_steps},
    }
    cfg = TrainConfig.model_validate(cfg_data)
    rewards = build_reward_functions([{"name": reward}])
    ours = GRPOTrainer(clone_model(model0), tok, cfg, rewards)

    # TRL: same initial weights, the prompts as the rendered text our model sees, our reward function
    texts = [[render_prompt(tok, ex, cfg.data.use_chat_template) for ex in batch] for batch in batches]
    t0 = time.perf_counter()
    trl_trainer = make_trl_trainer(clone_model(model0), copy.deepcopy(tok), shared,
                                   sorted({t for b in texts for t in b}), reward_funcs=[resolve_reward(reward)])
    stepper = TRLStepper(trl_trainer, max_steps=total_steps)
    log.info("TRL trainer set up in %.1f s", time.perf_counter() - t0)

    # identical prompt tokens, batch by batch
    our_ids = [ours.encode_prompts(batch)[1] for batch in batches]
    for i, (ids, txt) in enumerate(zip(our_ids, texts)):
        trl_ids = stepper.prompt_token_ids(txt)
        if trl_ids != ids:
            raise AssertionError(
                f"batch {i}: TRL tokenizes the prompts differently: {trl_ids[0][:12]} vs ours {ids[0][:12]}")

    # gradients on one identical batch (our first step's), from the same initial weights
    grad_cfg = TrainConfig.model_validate({**cfg_data, "grpo": {**cfg_data["grpo"], "use_behaviour_correction": False}})
    checker = GRPOTrainer(ours.model, tok, grad_cfg, rewards, ref_model=ours.ref_model)
    ctexts, rollouts = checker.rollout(batches[0], seed=cfg.run.seed * 1_000_003 + ours.step_count)
    gbatch = checker.prepare(checker.score(batches[0], ctexts, rollouts))
    grad_rewards = "batch"
    if float(gbatch.advantages.abs().max()) == 0.0:
        gen = torch.Generator().manual_seed(GRAD_CHECK_SEED)
        fake = torch.randint(0, 3, (rollouts.num_completions,), generator=gen).float()
        gbatch.advantages = grpo.group_advantages(fake, G, cfg.grpo.scale_rewards)
        grad_rewards = "random (every completion of the batch got the same reward)"
    g_ours = our_gradients(checker, gbatch)
    g_trl = trl_gradients(trl_trainer, gbatch, tok.pad_token_id)
    grad_diff = max_abs_diff(g_ours, g_trl)
    grad_scale = max(float(v.abs().max()) for v in g_trl.values())
    del checker, g_ours, g_trl
    log.info("max |grad diff| = %.3g (TRL grad scale %.3g, rewards: %s)", grad_diff, grad_scale, grad_rewards)

    peak_shape = (1024, dims.hidden, dims.intermediate or 4 * dims.hidden)
    peaks = [matmul_peak(*peak_shape)]

    captured: dict = {}
    prepare_fn = ours.prepare

    def capturing_prepare(scored):
        captured["scored"] = prepare_fn(scored)
        return captured["scored"]

    ours.prepare = capturing_prepare
    ours_before, trl_before = snapshot(ours.model), snapshot(trl_trainer.model)
    compact = _use_triton(trl_trainer.args.device)
    beta_passes = 1 if args.beta > 0 else 0
    recs = []
    for i, batch in enumerate(batches):
        # the machine's speed drifts: the peak is measured before and after every step (peaks[2i], [2i+1]: ours;
        # [2i+1], [2i+2]: TRL's); the largest of all and each step's two adjacent ones are both reported
        if i > 0:
            peaks.append(matmul_peak(*peak_shape, seconds=0.5))
        f0, t0 = minor_page_faults(), time.perf_counter()
        m = ours.step(batch)
        ours_time, ours_faults = time.perf_counter() - t0, minor_page_faults() - f0
        rb = captured["scored"].rollouts
        p_lens = [len(p) for p in rb.prompt_ids]
        c_lens = [int(x) for x in rb.completion_mask.sum(1).tolist()]
        oc = grouped_counts(p_lens, c_lens, G, dims.layers)

        rows = [{"prompt": t, **ex.columns} for t, ex in zip(texts[i], batch)]
        peaks.append(matmul_peak(*peak_shape, seconds=0.5))
        f0 = minor_page_faults()
        r = stepper.step(rows)
        trl_faults = minor_page_faults() - f0
        expected = Counter()
        for ids in our_ids[i]:
            expected[tuple(ids)] += G
        if dict(expected) != r.completions_per_prompt or r.num_completions != P * G:
            raise AssertionError(f"step {i}: TRL generated {r.num_completions} completions, per prompt "
                                 f"{sorted(r.completions_per_prompt.values())}; expected {P} x G={G}")
        tc = trl_processed_counts(r.num_completions, r.padded_prompt_width, r.padded_completion_width, compact,
                                  dims.layers)
        tu = grouped_counts(r.prompt_lengths[::G], r.completion_lengths, G, dims.layers)

        def step_flops(c):
            return train_flops(dims, c["train"]) + forward_flops(dims, c["generate"]) + \
                beta_passes * forward_flops(dims, c["frozen"])

        recs.append({
            "timed": i >= args.warmup,
            "ours_step": ours_time, "ours_gen_score": m["time_generate"] + m["time_score"],
            "ours_train": m["time_train"], "ours_train_flops": train_flops(dims, oc["train"]),
            "ours_step_flops": step_flops(oc), "ours_reward": m["reward_mean"],
            "ours_adv": m["zero_std_groups"] < 1.0, "ours_len": sum(c_lens) / len(c_lens),
            "trl_step": r.time_step, "trl_gen_score": r.time_generate_score, "trl_train": r.time_train,
            "trl_train_flops": train_flops(dims, tc["train"]), "trl_step_flops": step_flops(tc),
            "trl_useful_step_flops": step_flops(tu), "trl_reward": r.reward_mean, "trl_adv": r.max_abs_advantage > 0,
            "trl_len": sum(r.completion_lengths) / len(r.completion_lengths),
            "trl_widths": (r.padded_prompt_width, r.padded_completion_width),
            "ours_faults": ours_faults, "trl_faults": trl_faults,
        })
        log.info("step %d%s: ours %.2f s (generate %.2f, score %.2f, train %.2f) | TRL %.2f s (gen+score %.2f, "
                 "train %.2f) | TRL widths P=%d C=%d | page faults ours %d, TRL %d", i,
                 "" if i >= args.warmup else " (warm-up)", ours_time, m["time_generate"], m["time_score"],
                 m["time_train"], r.time_step, r.time_generate_score, r.time_train, *recs[-1]["trl_widths"],
                 ours_faults, trl_faults)
    stepper.close()
    peaks.append(matmul_peak(*peak_shape))
    for i, rec in enumerate(recs):  # peaks[2i] before our step i, [2i + 1] between it and TRL's, [2i + 2] after
        rec["ours_peak"] = (peaks[2 * i].sustained + peaks[2 * i + 1].sustained) / 2
        rec["trl_peak"] = (peaks[2 * i + 1].sustained + peaks[2 * i + 2].sustained) / 2
    # the training phase alone, bracketed by probes: the machine's speed at the time of each phase
    rounds, probes = interleaved_train_utilisation(
        ours, captured["scored"], recs[-1]["ours_train_flops"],
        lambda: matmul_peak(*peak_shape, seconds=args.probe_seconds).sustained, args.utilisation_rounds)
    log.info("training phase between probes: utilisation %s (probes %s GFLOP/s)",
             [f"{u:.1%}" for u in rounds], [round(p / 1e9, 1) for p in probes])
    peak = max(p.sustained for p in peaks)  # the largest of before / between / after: conservative
    peak_best = max(p.best for p in peaks)

    ours_change, trl_change = max_change(ours.model, ours_before), max_change(trl_trainer.model, trl_before)
    ours_adv_steps = sum(r["ours_adv"] for r in recs)
    trl_adv_steps = sum(r["trl_adv"] for r in recs)
    for name, change, adv_steps in (("ours", ours_change, ours_adv_steps), ("TRL", trl_change, trl_adv_steps)):
        if adv_steps and change == 0.0:
            log.warning("%s: %d step(s) had non-zero advantages but the weights did not change", name, adv_steps)
        if not adv_steps and change > 0.0:
            log.warning("%s: weights changed although every advantage was 0", name)

    timed = [r for r in recs if r["timed"]]

    def total(key):
        return sum(r[key] for r in timed)

    def adjacent(who):
        """Median over the timed steps of the step's train FLOP/s over the mean of the peaks measured just
        before and just after that step (both trainers run back to back, so the drift between them is small)."""
        return statistics.median(r[f"{who}_train_flops"] / r[f"{who}_train"] / r[f"{who}_peak"] for r in timed)

    n_comp = P * G * len(timed)
    ours_cps, trl_cps = n_comp / total("ours_step"), n_comp / total("trl_step")
    ours_train_fps = total("ours_train_flops") / total("ours_train")
    trl_train_fps = total("trl_train_flops") / total("trl_train")
    res = {
        "model": args.model,
        "ours_completions_per_s": ours_cps,
        "trl_completions_per_s": trl_cps,
        "ratio": ours_cps / trl_cps,
        "max_abs_grad_diff": grad_diff,
        "config": {
            "shared": {**shared.as_dict(), "dataset": args.dataset, "reward": reward, "top_p": 1.0, "top_k": 0,
                       "device": "cpu", "dtype": "float32"},
            "trl_defaults_kept": trl_defaults_kept(trl_trainer),
            "trl_overrides": ["use_cpu=True", "bf16=False", "report_to=[]", "save_strategy='no'",
                              "logging_steps=1e6", f"per_device_train_batch_size={P * G}"],
            "ours": {"use_behaviour_correction": cfg.grpo.use_behaviour_correction,
                     "groups_per_microbatch": cfg.optim.groups_per_microbatch,
                     "adam_betas": list(cfg.optim.adam_betas), "weight_decay": cfg.optim.weight_decay,
                     "max_grad_norm": cfg.optim.max_grad_norm, "lr_schedule": "constant (warmup_steps=0)",
                     "generation": "prefix-shared prefill, finished rows leave the batch"},
        },
        "timed_steps": len(timed), "warmup_steps": args.warmup, "threads": torch.get_num_threads(),
        "keep_freed_memory": kept,
        "completions_per_step": P * G,
        "ours_step_s": total("ours_step") / len(timed), "trl_step_s": total("trl_step") / len(timed),
        "ours_generate_score_s": total("ours_gen_score") / len(timed),
        "trl_generate_score_s": total("trl_gen_score") / len(timed),
        "ours_train_s": total("ours_train") / len(timed), "trl_train_s": total("trl_train") / len(timed),
        "peak_flops_per_s": peak, "peak_best_rep_flops_per_s": peak_best, "peak_shape": list(peak_shape),
        "peak_sustained_samples": [p.sustained for p in peaks],
        "ours_train_utilisation_vs_best_rep": ours_train_fps / peak_best,
        "trl_train_utilisation_vs_best_rep": trl_train_fps / peak_best,
        "ours_train_flops_per_s": ours_train_fps, "ours_train_utilisation": ours_train_fps / peak,
        "ours_train_utilisation_adjacent_peak": adjacent("ours"),
        "ours_train_utilisation_interleaved": statistics.median(rounds) if rounds else None,
        "interleaved_rounds": {"utilisation": rounds, "probe_flops_per_s": probes,
                               "train_flops": recs[-1]["ours_train_flops"],
                               "probe_seconds": args.probe_seconds},
        "trl_train_utilisation_adjacent_peak": adjacent("trl"),
        "ours_step_utilisation": total("ours_step_flops") / total("ours_step") / peak,
        "trl_train_flops_per_s": trl_train_fps, "trl_train_utilisation": trl_train_fps / peak,
        "trl_step_utilisation": total("trl_step_flops") / total("trl_step") / peak,
        "trl_useful_step_utilisation": total("trl_useful_step_flops") / total("trl_step") / peak,
        "flops_per_step": {k: total(k) / len(timed) for k in
                           ("ours_train_flops", "ours_step_flops", "trl_train_flops", "trl_step_flops",
                            "trl_useful_step_flops")},
        "model_dims": {"non_embedding_params": dims.non_embedding_params, "hidden": dims.hidden,
                       "vocab": dims.vocab, "intermediate": dims.intermediate},
        "grad_check": {"max_abs_grad_diff": grad_diff, "trl_grad_scale": grad_scale, "rewards": grad_rewards},
        "prompt_tokens_identical": True,
        "trl_completions_per_prompt_ok": True,
        "ours_reward_mean": sum(r["ours_reward"] for r in recs) / len(recs),
        "trl_reward_mean": sum(r["trl_reward"] for r in recs) / len(recs),
        "ours_mean_completion_length": sum(r["ours_len"] for r in recs) / len(recs),
        "trl_mean_completion_length": sum(r["trl_len"] for r in recs) / len(recs),
        "trl_padded_widths": [list(r["trl_widths"]) for r in recs],
        "minor_page_faults_per_step": {"ours": [r["ours_faults"] for r in recs], "trl": [r["trl_faults"] for r in recs]},
        "ours_nonzero_advantage_steps": ours_adv_steps, "trl_nonzero_advantage_steps": trl_adv_steps,
        "ours_max_weight_change": ours_change, "trl_max_weight_change": trl_change,
        "ours_weights_changed": ours_change > 0, "trl_weights_changed": trl_change > 0,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries that print must not break the one-JSON-line contract
        res = run(args)
        missing = [k for k in REQUIRED_KEYS if k not in res]
        if missing:
            raise AssertionError(f"result lacks {missing}")
        print_table(res)
    real_stdout.write(json.dumps(res) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
