"""The vLLM backend's conversion and plumbing, against a FAKE engine.

vLLM needs a GPU; this fake only mimics its output objects (``RequestOutput`` with ``outputs``,
``CompletionOutput`` with ``index``/``token_ids``/``logprobs``/``finish_reason``, ``Logprob`` with
``logprob``) and the ``LLM`` methods the backend calls. Nothing here runs a real vLLM engine.
"""

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from grpo_swarm.node.backends import make_backend
from grpo_swarm.node.config import ConfigError, load_config
from grpo_swarm.node.config import TrainConfig
from grpo_swarm.node.logprobs import completion_logprobs
from grpo_swarm.node.models import build_tiny_model
from grpo_swarm.node.rollout import SamplingParams, TransformersBackend
from grpo_swarm.node.rollout_vllm import (
    VLLM_INSTALL_HINT,
    SamplingParamsStandIn,
    VLLMBackend,
    outputs_to_rollout_batch,
)

PAD, EOS = 0, 1
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def completion(index, token_ids, finish_reason, logps=None):
    """A fake CompletionOutput: logprobs[t] = {sampled token: Logprob}, as with SamplingParams(logprobs=0)."""
    logps = logps if logps is not None else [-0.1 * (t + 1) - index for t in range(len(token_ids))]
    return SimpleNamespace(
        index=index, token_ids=list(token_ids), finish_reason=finish_reason,
        logprobs=[{tok: SimpleNamespace(logprob=lp, rank=1, decoded_token=None)}
                  for tok, lp in zip(token_ids, logps)],
    )


def request(prompt, completions):
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=list(completions))


PROMPTS = [[5, 6, 7], [8, 9]]


def fake_outputs():
    # prompt 0: completions given out of index order (vLLM orders them; we must not rely on it)
    r0 = request(PROMPTS[0], [
        completion(1, [12, 13, 14, 15], "length"),
        completion(0, [10, 11, EOS], "stop", logps=[-0.5, -0.25, -0.125]),
    ])
    r1 = request(PROMPTS[1], [
        completion(0, [20, EOS], "stop"),
        completion(1, [21, 22, 23, EOS], "length"),  # EOS sampled exactly at max_tokens: finished
    ])
    return [r0, r1]


def test_conversion_order_padding_masks_and_logprobs():
    batch = outputs_to_rollout_batch(fake_outputs(), PROMPTS, 2, PAD, eos_token_ids=[EOS])
    assert batch.group_size == 2 and batch.num_groups == 2 and batch.num_completions == 4
    assert [p.tolist() for p in batch.prompt_ids] == PROMPTS
    # group-major: prompt i's completions at rows i*G .. i*G+G-1, in completion-index order
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
    assert torch.allclose(batch.behaviour_logps[2], torch.tensor([-0.1, -0.2, 0.0, 0.0]))
    assert (batch.behaviour_logps * (1 - batch.completion_mask)).abs().sum() == 0


def test_length_without_eos_ids_is_truncated():
    batch = outputs_to_rollout_batch(fake_outputs(), PROMPTS, 2, PAD)  # no EOS ids given
    assert batch.truncated.tolist() == [False, True, False, True]


def test_conversion_rejects_malformed_outputs():
    outs = fake_outputs()
    with pytest.raises(ValueError, match="2 vLLM outputs for 1 prompts"):
        outputs_to_rollout_batch(outs, PROMPTS[:1], 2, PAD)
    with pytest.raises(ValueError, match="expected G=3"):
        outputs_to_rollout_batch(outs, PROMPTS, 3, PAD)
    with pytest.raises(ValueError, match="another prompt"):
        outputs_to_rollout_batch(outs[::-1], PROMPTS, 2, PAD)
    no_lp = fake_outputs()
    no_lp[0].outputs[0].logprobs = None
    with pytest.raises(ValueError, match="logprobs=0"):
        outputs_to_rollout_batch(no_lp, PROMPTS, 2, PAD)
    aborted = fake_outputs()
    aborted[1].outputs[0].finish_reason = "abort"
    with pytest.raises(ValueError, match="'abort'"):
        outputs_to_rollout_batch(aborted, PROMPTS, 2, PAD)
    nan = fake_outputs()
    nan[1].outputs[0].logprobs[0][20].logprob = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        outputs_to_rollout_batch(nan, PROMPTS, 2, PAD)


def test_batch_scores_through_completion_logprobs():
    model = build_tiny_model(0).model
    batch = outputs_to_rollout_batch(fake_outputs(), PROMPTS, 2, PAD, eos_token_ids=[EOS])
    with torch.no_grad():
        scores = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.group_size,
                                     pad_token_id=PAD)
    assert scores.logps.shape == batch.completion_mask.shape
    assert torch.isfinite(scores.logps).all()
    assert ((scores.logps < 0) | (batch.completion_mask == 0)).all()


class FakeLLM:
    """Records what the backend sends; answers with ``fake_outputs()``-style objects."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.calls = []
        self.loaded = []
        self.cache_resets = 0

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(dict(prompts=prompts, sampling_params=sampling_params, use_tqdm=use_tqdm))
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


def test_generate_end_to_end_with_fake_llm():
    llm = FakeLLM(fake_outputs())
    backend = VLLMBackend(llm, eos_token_ids=[EOS, 3], pad_token_id=PAD)
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=0)
    batch = backend.generate(PROMPTS, 2, params, seed=123)

    assert batch.completion_ids.shape == (4, 4)
    assert batch.truncated.tolist() == [False, True, False, False]
    (call,) = llm.calls
    assert call["use_tqdm"] is False
    assert call["prompts"] == [{"prompt_token_ids": p} for p in PROMPTS]
    sent = call["sampling_params"]
    assert len(sent) == len(PROMPTS)
    if not VLLM_INSTALLED:
        assert all(isinstance(sp, SamplingParamsStandIn) for sp in sent)
    for i, sp in enumerate(sent):
        assert sp.n == 2 and sp.logprobs == 0 and sp.max_tokens == 4
        assert sp.temperature == 0.7 and sp.top_p == 0.9 and sp.top_k == -1
        assert sp.seed == 123 + i * 2  # vLLM adds the completion index: all 4 completions get distinct seeds
        assert list(sp.stop_token_ids) == [EOS, 3]
        assert sp.detokenize is False

    backend.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, top_k=5), seed=0)
    assert llm.calls[-1]["sampling_params"][0].top_k == 5


def test_generate_rejects_empty_prompts_and_engine_options_with_llm():
    backend = VLLMBackend(FakeLLM(fake_outputs()), eos_token_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        backend.generate([[5], []], 2, SamplingParams(), seed=0)
    with pytest.raises(TypeError, match="already-built LLM"):
        VLLMBackend(FakeLLM([]), eos_token_ids=[EOS], pad_token_id=PAD, max_model_len=128)
    with pytest.raises(ValueError, match="EOS"):
        VLLMBackend(FakeLLM([]), eos_token_ids=[], pad_token_id=PAD)


def test_raw_logprobs_engine_warns():
    llm = FakeLLM([])
    llm.llm_engine = SimpleNamespace(model_config=SimpleNamespace(logprobs_mode="raw_logprobs"))
    with pytest.warns(UserWarning, match="processed_logprobs"):
        VLLMBackend(llm, eos_token_ids=[EOS], pad_token_id=PAD)


def test_load_weights_goes_through_apply_model_and_resets_prefix_cache():
    llm = FakeLLM([])
    backend = VLLMBackend(llm, eos_token_ids=[EOS], pad_token_id=PAD)
    w = torch.ones(2, 2, requires_grad=True)
    backend.load_weights({"model.embed_tokens.weight": w, "lm_head.weight": torch.zeros(2)})
    (weights,) = llm.loaded
    assert [name for name, _ in weights] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert not weights[0][1].requires_grad
    assert llm.cache_resets == 1


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
