"""The vLLM keyed-noise logits processor (node/vllm_keyed_sampling.py) and VLLMBackend on it, against a
FAKE engine (tests/fake_vllm_engine.py).

vLLM cannot be installed or run here (no GPU): the fake stands in for it, mimicking the V1 logits
processor protocol (update_state with added / moved / swapped / removed requests, apply on a batch
of requests at different positions, greedy sampling). These tests show that the processor's forced
logits reproduce TransformersBackend's keyed sampling token for token and that the verifier's
spot-check accepts the result. The real vLLM engine path is UNTESTED.
"""

from __future__ import annotations

import pytest
import torch
from fake_vllm_engine import FakeVLLMEngine
from protocol_world import identity, teach_addition

from grpo_swarm.node import proving, rollout
from grpo_swarm.node import vllm_keyed_sampling as keyed
from grpo_swarm.node.data import arithmetic_examples, render_prompt
from grpo_swarm.node.models import build_tiny_model
from grpo_swarm.node.noise import completion_noise, group_keys, keys_tensor, position_seeds, row_seeds
from grpo_swarm.node.rollout import SamplingParams, TransformersBackend, seed_noise_keys
from grpo_swarm.node.rollout_vllm import SamplingParamsStandIn, VLLMBackend
from grpo_swarm.node.vllm_keyed_sampling import KeyedNoiseLogitsProcessor, keyed_request_args
from grpo_swarm.protocol.proofs import build_reward_proof
from grpo_swarm.protocol.verify import VerifierPolicy

RUN_SEED, G = 77, 4
NODE = identity(3)
PARAMS = [
    SamplingParams(max_new_tokens=4, temperature=0.7),
    SamplingParams(max_new_tokens=4, temperature=1.3, top_k=5),
    SamplingParams(max_new_tokens=4, temperature=0.9, top_p=0.8),
    SamplingParams(max_new_tokens=4, top_k=8, top_p=0.9),
]


@pytest.fixture(scope="module")
def world():
    """The tiny model taught a little addition (EOS and different lengths), its prompts and examples."""
    loaded = build_tiny_model(0)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = arithmetic_examples(24, seed=1, max_operand=9)
    teach_addition(model, tokenizer, examples, steps=10)
    model.eval()
    texts = [render_prompt(tokenizer, ex, use_chat_template=False) for ex in examples[:3]]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    eos, pad = rollout.eos_and_pad_ids(model, tokenizer)
    return dict(model=model, tokenizer=tokenizer, examples=examples, texts=texts, prompts=prompts, eos=eos, pad=pad)


def both_backends(w, params, keys, **engine):
    reference = TransformersBackend(w["model"], w["eos"], w["pad"]).generate(w["prompts"], G, params, 0, noise_keys=keys)
    llm = FakeVLLMEngine(w["model"], KeyedNoiseLogitsProcessor, **engine)
    batch = VLLMBackend(llm, w["eos"], w["pad"]).generate(w["prompts"], G, params, 0, noise_keys=keys)
    return reference, batch, llm


@pytest.mark.parametrize("params", PARAMS, ids=["temperature", "top-k", "top-p", "top-k+top-p"])
def test_fake_vllm_samples_what_transformers_samples(world, params):
    """Same weights, keys and sampling params: the same completions token for token, the same
    behaviour log-probs, while the fake batch adds, moves, swaps and removes requests and holds them at
    different positions."""
    keys = group_keys(RUN_SEED, NODE.node_id, 2, [0, 1, 2], G)
    reference, batch, llm = both_backends(world, params, keys)
    assert batch.completion_lists() == reference.completion_lists()
    assert torch.equal(batch.truncated, reference.truncated)
    assert (batch.behaviour_logps - reference.behaviour_logps).abs().max() < 1e-5
    assert not reference.truncated.all() and reference.truncated.any()  # EOS and the length limit both occur
    updates = [u for u in llm.updates if u is not None]
    assert any(u.removed for u in updates) and any(m[2].name == "SWAP" for u in updates for m in u.moved)
    assert any(m[2].name == "UNIDIRECTIONAL" for u in updates for m in u.moved)
    assert any(len(set(p)) > 1 for p in llm.batch_positions)  # one batch, several positions


def test_older_added_tuples_and_no_swaps_give_the_same_completions(world):
    """vLLM < 0.11 sends (index, params, output ids) without the prompt ids; and a batch that is never
    reordered: the same completions."""
    keys = seed_noise_keys(5, 3, G)
    reference, batch, _ = both_backends(world, PARAMS[1], keys, added_arity=3, swap_every=0, max_batch=5)
    assert batch.completion_lists() == reference.completion_lists()


def test_spot_check_accepts_fake_vllm_completions(world):
    """The verifier's recomputation (proving.make_logprob_fn with the run seed) finds every token the
    noisy argmax and the behaviour log-probs equal to its own."""
    w, params = world, PARAMS[2]
    keys = group_keys(RUN_SEED, NODE.node_id, 0, [0, 1, 2], G)
    llm = FakeVLLMEngine(w["model"], KeyedNoiseLogitsProcessor)
    batch = VLLMBackend(llm, w["eos"], w["pad"]).generate(w["prompts"], G, params, 0, noise_keys=keys)
    fn = proving.make_logprob_fn(w["model"], w["tokenizer"], w["examples"], temperature=params.temperature,
                                 top_p=params.top_p, top_k=params.top_k, use_chat_template=False, run_seed=RUN_SEED)
    policy = VerifierPolicy(reward_specs=[{"name": "arithmetic_accuracy", "weight": 1.0, "args": {}}],
                            max_completion_tokens=params.max_new_tokens, sampling_tolerance=0.05)
    for row, ids in enumerate(batch.completion_lists()):
        j, k = divmod(row, G)
        proof = build_reward_proof(
            run_id="r", policy_version=0, snapshot_sha256=bytes(32), round_index=0, prompt_index=j,
            prompt_text=w["texts"][j], group_id=f"g{j}", group_size=G, completion_index=k, completion_token_ids=ids,
            completion_text="", behaviour_logprobs=batch.behaviour_logps[row, : len(ids)].tolist(),
            rewards=[("a", 0.0)], reward_total=0.0, reward_spec_id="s", advantage=0.0, sequence=row,
            node_public_key=NODE.public_key_bytes)
        got = fn(proof)
        assert max(abs(a - b) for a, b in zip(got.logprobs, proof.behaviour_logprobs)) <= policy.spot_check_max_abs / 10
        assert max(got.shortfalls) <= policy.sampling_tolerance / 100  # every token the keyed argmax
        if row == 0:  # the verifier recomputes in float32 whatever autocast its caller runs under
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert fn(proof) == got


def test_requests_without_a_key_are_untouched(world):
    """An unkeyed request in the same batch keeps its logits: the engine's greedy sampler gives the
    model's own greedy continuation; the keyed ones still match TransformersBackend."""
    w, params = world, PARAMS[0]
    keys = seed_noise_keys(9, 1, 2)
    prompt = w["prompts"][0]
    llm = FakeVLLMEngine(w["model"], KeyedNoiseLogitsProcessor, max_batch=2)
    backend = VLLMBackend(llm, w["eos"], w["pad"])
    plain = SamplingParamsStandIn(n=1, temperature=0.0, max_tokens=5, stop_token_ids=[], detokenize=False)
    sent = [backend.sampling_params(params, keys[0], "a"), plain, backend.sampling_params(params, keys[1], "b")]
    try:
        out = llm.generate([{"prompt_token_ids": prompt}] * 3, sent, use_tqdm=False)
    finally:
        keyed.discard(["a", "b"])
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(w["model"](input_ids=torch.tensor([greedy])).logits[0, -1].argmax()))
    assert out[1].outputs[0].token_ids == greedy[len(prompt):]
    reference = TransformersBackend(w["model"], w["eos"], w["pad"]).generate([prompt], 2, params, 0, noise_keys=keys)
    assert [out[0].outputs[0].token_ids, out[2].outputs[0].token_ids] == reference.completion_lists()

    processor = KeyedNoiseLogitsProcessor()
    logits = torch.randn(2, 11)
    assert processor.apply(logits.clone()).equal(logits)  # no request at all: nothing changes


def forced_token(key, position: int, logits: torch.Tensor, params: SamplingParams) -> int:
    """One apply on a one-request batch whose request has ``position`` output tokens."""
    processor = KeyedNoiseLogitsProcessor()
    added = [(0, SamplingParamsStandIn(extra_args=keyed_request_args(key, params, "t")), [], [7] * position)]
    processor.update_state(type("U", (), dict(batch_size=1, removed=[], added=added, moved=[]))())
    row = processor.apply(logits.clone()[None])[0]
    keyed.discard(["t"])
    assert torch.isfinite(row).sum() == 1 and row.max() == 0  # one token forced, the rest -inf
    return int(row.argmax())


def test_position_is_the_number_of_output_tokens_so_far():
    """The token at position t is argmax(lp + g_t) with g_t the completion's noise at t (0 = the first
    generated token): not g_{t-1} nor g_{t+1}. Flat logits: the token is the noise's own argmax."""
    key, params, vocab = (0x12345678, 0x9ABCDEF0), SamplingParams(), 97
    noise = completion_noise(key, 12, vocab)
    assert len({int(noise[t].argmax()) for t in range(12)}) > 6  # positions draw different argmaxes
    for t in range(1, 11):
        got = forced_token(key, t, torch.zeros(vocab), params)
        assert got == int(noise[t].argmax())
        assert got != int(noise[t - 1].argmax()) or got != int(noise[t + 1].argmax())
    assert forced_token(key, 0, torch.zeros(vocab), params) == int(noise[0].argmax())


def test_row_seeds_match_position_seeds():
    keys = keys_tensor([(1, 2), (0xFFFFFFFF, 0x80000000), (0x8D0EF36E, 0xB6FB9AE9)], "cpu")
    positions = torch.tensor([0, 2**31 + 5, 2**32 - 1])
    want = torch.stack([position_seeds(keys[i:i + 1], int(t), 1)[0, 0] for i, t in enumerate(positions)])
    assert torch.equal(row_seeds(keys, positions), want)


def test_missing_records_are_an_error_not_zeros(world):
    """An engine that did not run the processor (another process, or built without it) leaves no
    records: generate fails and says how to build the engine."""
    w = world

    class NoProcessor(KeyedNoiseLogitsProcessor):
        def apply(self, logits):
            return logits

    backend = VLLMBackend(FakeVLLMEngine(w["model"], NoProcessor), w["eos"], w["pad"])
    before = set(keyed._records)
    with pytest.raises(RuntimeError, match="logits_processors=\\[KeyedNoiseLogitsProcessor\\]"):
        backend.generate(w["prompts"][:1], 2, PARAMS[0], 0)
    assert set(keyed._records) <= before and not keyed._pending  # nothing left behind
