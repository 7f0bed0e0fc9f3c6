"""The vLLM backend's conversion and plumbing, against a FAKE engine.

vLLM needs a GPU; this fake only mimics its output objects (``RequestOutput`` with ``outputs``,
``CompletionOutput`` with ``index``/``token_ids``/``finish_reason``) and the ``LLM`` methods the
backend calls. Nothing here runs a real vLLM engine. tests/test_vllm_keyed_sampling.py runs the
backend on a fake engine that drives the keyed-noise logits processor on a tiny model.
"""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from grpo_swarm.node import backends
from grpo_swarm.node import vllm_keyed_sampling as keyed
from grpo_swarm.node.backends import make_backend, resolve_backend
from grpo_swarm.node.config import ConfigError, load_config
from grpo_swarm.node.config import TrainConfig
from grpo_swarm.node.logprobs import completion_logprobs
from grpo_swarm.node.models import build_tiny_model
from grpo_swarm.node.rollout import SamplingParams, TransformersBackend, seed_noise_keys
from grpo_swarm.node.rollout_vllm import (
    VLLM_INSTALL_HINT,
    SamplingParamsStandIn,
    VLLMBackend,
    completions_to_rollout_batch,
    read_completions,
)

PAD, EOS = 0, 1
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def request(prompt, token_ids, finish_reason):
    """A fake RequestOutput of one n=1 request."""
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=[
        SimpleNamespace(index=0, token_ids=list(token_ids), finish_reason=finish_reason, logprobs=None)])


PROMPTS = [[5, 6, 7], [8, 9]]
SENT = [{"prompt_token_ids": p} for p in PROMPTS for _ in range(2)]  # group-major, G = 2


def fake_outputs():
    return [
        request(PROMPTS[0], [10, 11, EOS], "stop"),
        request(PROMPTS[0], [12, 13, 14, 15], "length"),
        request(PROMPTS[1], [20, EOS], "stop"),
        request(PROMPTS[1], [21, 22, 23, EOS], "length"),  # EOS sampled exactly at max_tokens: finished
    ]


def fake_logps(completions):
    return [[-0.1 * (t + 1) - r for t in range(len(ids))] for r, (ids, _) in enumerate(completions)]


def test_conversion_order_padding_masks_and_logprobs():
    completions = read_completions(fake_outputs(), SENT)
    logps = fake_logps(completions)
    logps[0] = [-0.5, -0.25, -0.125]
    batch = completions_to_rollout_batch(completions, logps, PROMPTS, 2, PAD, eos_token_ids=[EOS])
    assert batch.group_size == 2 and batch.num_groups == 2 and batch.num_completions == 4
    assert [p.tolist() for p in batch.prompt_ids] == PROMPTS
    assert batch.completion_ids.tolist() == [
        [10, 11, EOS, PAD],
        [12, 13, 14, 15],
        [20, EOS, PAD, PAD],
        [21, 22, 23, EOS],
    ]
    assert batch.completion_mask.dtype == torch.float32
    assert batch.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.completion_lists() == [[10, 11, EOS], [12, 13, 14, 15], [20, EOS], [21, 22, 23, EOS]]
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.behaviour_logps.dtype == torch.float32
    assert batch.behaviour_logps[0].tolist() == [-0.5, -0.25, -0.125, 0.0]  # EOS log-prob kept, 0 on padding
    assert torch.allclose(batch.behaviour_logps[1], torch.tensor([-1.1, -1.2, -1.3, -1.4]))
    assert torch.allclose(batch.behaviour_logps[2], torch.tensor([-2.1, -2.2, 0.0, 0.0]))
    assert (batch.behaviour_logps * (1 - batch.completion_mask)).abs().sum() == 0


def test_length_without_eos_ids_is_truncated():
    completions = read_completions(fake_outputs(), SENT)
    batch = completions_to_rollout_batch(completions, fake_logps(completions), PROMPTS, 2, PAD)  # no EOS ids
    assert batch.truncated.tolist() == [False, True, False, True]


def test_conversion_rejects_malformed_outputs():
    outs = fake_outputs()
    with pytest.raises(ValueError, match="4 vLLM outputs for 2 requests"):
        read_completions(outs, SENT[:2])
    with pytest.raises(ValueError, match="another prompt"):
        read_completions(outs[::-1], SENT)
    two = fake_outputs()
    two[0].outputs.append(two[0].outputs[0])
    with pytest.raises(ValueError, match="2 completions, expected 1"):
        read_completions(two, SENT)
    aborted = fake_outputs()
    aborted[1].outputs[0].finish_reason = "abort"
    with pytest.raises(ValueError, match="'abort'"):
        read_completions(aborted, SENT)
    completions = read_completions(outs, SENT)
    with pytest.raises(ValueError, match="for 2 prompts x G=3"):
        completions_to_rollout_batch(completions, fake_logps(completions), PROMPTS, 3, PAD)
    short = fake_logps(completions)
    short[2] = short[2][:1]
    with pytest.raises(ValueError, match="completion 2: 2 tokens but 1 log-probs"):
        completions_to_rollout_batch(completions, short, PROMPTS, 2, PAD)
    nan = fake_logps(completions)
    nan[3][0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        completions_to_rollout_batch(completions, nan, PROMPTS, 2, PAD)


def test_batch_scores_through_completion_logprobs():
    model = build_tiny_model(0).model
    completions = read_completions(fake_outputs(), SENT)
    batch = completions_to_rollout_batch(completions, fake_logps(completions), PROMPTS, 2, PAD, eos_token_ids=[EOS])
    with torch.no_grad():
        scores = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.group_size,
                                     pad_token_id=PAD)
    assert scores.logps.shape == batch.completion_mask.shape
    assert torch.isfinite(scores.logps).all()
    assert ((scores.logps < 0) | (batch.completion_mask == 0)).all()


class FakeLLM:
    """Records what the backend sends; answers with ``fake_outputs()`` and records behaviour log-probs
    for the request ids it was sent, as the keyed-noise processor would."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.calls = []
        self.loaded = []
        self.cache_resets = 0

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(dict(prompts=prompts, sampling_params=sampling_params, use_tqdm=use_tqdm))
        for sp, out in zip(sampling_params, self.outputs):
            record = sp.extra_args[keyed.EXTRA_ARGS_KEY]["record"]
            n = len(out.outputs[0].token_ids)
            keyed._pending.append(([record] * n, list(range(n)), torch.full((n,), -0.5)))
        return self.outputs

    def apply_model(self, func):
        model = SimpleNamespace(load_weights=lambda weights: self.loaded.append(list(weights)))
        return [func(model)]

    def reset_prefix_cache(self):
        self.cache_resets += 1


@pytest.mark.skipif(VLLM_INSTALLED, reason="vllm is installed here")
def test_string_model_without_vllm_raises_helpful_import_error():
    with pytest.raises(ImportError, match="needs a GPU and `pip install 'grpo-swarm\\[vllm\\]'`"):
        VLLMBackend("some/model", eos_token_ids=[EOS], pad_token_id=PAD)
    assert "pip install 'grpo-swarm[vllm]'" in VLLM_INSTALL_HINT


def test_generate_sends_one_keyed_greedy_request_per_completion():
    llm = FakeLLM(fake_outputs())
    backend = VLLMBackend(llm, eos_token_ids=[EOS, 3], pad_token_id=PAD)
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=0)
    batch = backend.generate(PROMPTS, 2, params, seed=123)

    assert batch.completion_ids.shape == (4, 4)
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.behaviour_logps[1].tolist() == [-0.5] * 4 and batch.behaviour_logps[0, 3] == 0
    (call,) = llm.calls
    assert call["use_tqdm"] is False
    assert call["prompts"] == SENT
    sent = call["sampling_params"]
    if not VLLM_INSTALLED:
        assert all(isinstance(sp, SamplingParamsStandIn) for sp in sent)
    keys = seed_noise_keys(123, 2, 2)  # no keys given: derived from the seed, as TransformersBackend
    records = set()
    for sp, key in zip(sent, keys):
        assert sp.n == 1 and sp.temperature == 0.0 and sp.max_tokens == 4 and sp.logprobs is None
        assert list(sp.stop_token_ids) == [EOS, 3] and sp.detokenize is False
        ours = sp.extra_args[keyed.EXTRA_ARGS_KEY]
        assert ours["key"] == list(key) and ours["temperature"] == 0.7 and ours["top_p"] == 0.9 and ours["top_k"] == 0
        records.add(ours["record"])
    assert len(records) == 4 and not records & set(keyed._records)  # taken, not left behind

    given = [(i, i + 1) for i in range(4)]
    backend.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, top_k=5), seed=0, noise_keys=given)
    assert [sp.extra_args[keyed.EXTRA_ARGS_KEY]["key"] for sp in llm.calls[-1]["sampling_params"]] == \
        [list(k) for k in given]
    assert llm.calls[-1]["sampling_params"][0].extra_args[keyed.EXTRA_ARGS_KEY]["top_k"] == 5


def test_generate_rejects_empty_prompts_wrong_keys_and_engine_options_with_llm():
    backend = VLLMBackend(FakeLLM(fake_outputs()), eos_token_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        backend.generate([[5], []], 2, SamplingParams(), seed=0)
    with pytest.raises(ValueError, match="3 noise keys for 2 prompts x G=2"):
        backend.generate(PROMPTS, 2, SamplingParams(), seed=0, noise_keys=[(1, 2)] * 3)
    with pytest.raises(TypeError, match="already-built LLM"):
        VLLMBackend(FakeLLM([]), eos_token_ids=[EOS], pad_token_id=PAD, max_model_len=128)
    with pytest.raises(ValueError, match="EOS"):
        VLLMBackend(FakeLLM([]), eos_token_ids=[], pad_token_id=PAD)


def test_load_weights_goes_through_apply_model_and_resets_prefix_cache():
    llm = FakeLLM([])
    backend = VLLMBackend(llm, eos_token_ids=[EOS], pad_token_id=PAD)
    w = torch.ones(2, 2, requires_grad=True)
    backend.load_weights({"model.embed_tokens.weight": w, "lm_head.weight": torch.zeros(2)})
    (weights,) = llm.loaded
    assert [name for name, _ in weights] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert not weights[0][1].requires_grad
    assert llm.cache_resets == 1


def test_sync_weights_pushes_only_changed_weights():
    """The engine holds its own copy: pushed at first, then after each in-place change (an optimizer
    step, load_state_dict), not when nothing changed."""
    llm = FakeLLM([])
    backend = VLLMBackend(llm, eos_token_ids=[EOS], pad_token_id=PAD)
    model = build_tiny_model(0).model
    assert backend.sync_weights(model) and len(llm.loaded) == 1
    assert not backend.sync_weights(model) and len(llm.loaded) == 1
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert backend.sync_weights(model) and len(llm.loaded) == 2
    model.load_state_dict(build_tiny_model(1).model.state_dict())
    assert backend.sync_weights(model) and len(llm.loaded) == 3
    names = [n for n, _ in llm.loaded[-1]]
    assert names == list(model.state_dict()) and llm.cache_resets == 3


def test_trainer_syncs_the_engine_before_each_rollout():
    from grpo_swarm.node.data import arithmetic_examples
    from grpo_swarm.node.rewards import build_reward_functions
    from grpo_swarm.node.trainer import GRPOTrainer

    loaded = build_tiny_model(0)
    cfg = load_config(None, ["grpo.group_size=2", "grpo.max_completion_length=3"])
    synced = []

    class Engine:
        def sync_weights(self, model):
            synced.append(model)

        def generate(self, prompt_ids, group_size, params, seed, **kw):
            return TransformersBackend(loaded.model, [EOS], PAD).generate(prompt_ids, group_size, params, seed, **kw)

    trainer = GRPOTrainer(loaded.model, loaded.tokenizer, cfg, build_reward_functions([]), backend=Engine())
    trainer.rollout(arithmetic_examples(2, seed=0), seed=0)
    assert synced == [loaded.model]


def test_make_backend_defaults_to_transformers():
    loaded = build_tiny_model(0)
    cfg = TrainConfig()
    backend = make_backend(cfg, loaded.model, loaded.tokenizer)
    assert isinstance(backend, TransformersBackend)
    assert backend.eos.tolist() == [EOS] and backend.pad_id == PAD

    with pytest.raises(ConfigError, match="model.backend"):
        load_config(None, ["model.backend='nonsense'"])


@pytest.mark.skipif(VLLM_INSTALLED, reason="vllm is installed here")
def test_make_backend_vllm_without_vllm_fails_before_writing(tmp_path):
    loaded = build_tiny_model(0)
    cfg = load_config(None, ["model.backend='vllm'", f"run.output_dir='{tmp_path / 'run'}'"])
    with pytest.raises(ImportError, match="needs a GPU"):
        make_backend(cfg, loaded.model, loaded.tokenizer)
    assert not (tmp_path / "run").exists()


def test_resolve_backend(monkeypatch):
    """--backend for join: transformers as asked; vllm only with vLLM importable and not on the CPU
    (the error names the install); auto = vllm on CUDA when it imports, else transformers."""
    monkeypatch.setattr("grpo_swarm.node.rollout_vllm.vllm_importable", lambda: False)
    assert resolve_backend("transformers", "cpu") == "transformers"
    assert resolve_backend("auto", "auto") == "transformers"
    with pytest.raises(ValueError, match="one of transformers, vllm, auto"):
        resolve_backend("tensorrt")
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_backend("vllm", "cpu")
    if not VLLM_INSTALLED:
        with pytest.raises(ValueError, match="pip install 'grpo-swarm\\[vllm\\]'"):
            resolve_backend("vllm", "cuda")
    monkeypatch.setattr("grpo_swarm.node.rollout_vllm.vllm_importable", lambda: True)
    monkeypatch.setattr("grpo_swarm.node.rollout_vllm._import_vllm", lambda: None)
    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "auto") == "vllm" and resolve_backend("vllm", "cuda") == "vllm"
    assert resolve_backend("auto", "cpu") == "transformers"
    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "auto") == "transformers"
