"""Tests for grpo_swarm.node.rewards: built-in rewards, plugin registry, and the validating combiner."""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_swarm.node import rewards as R
from grpo_swarm.node.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    RewardFunction,
    arithmetic_accuracy,
    build_reward_functions,
    compute_rewards,
    extract_gsm8k_answer,
    format_reward,
    gsm8k_accuracy,
    math_accuracy,
    overlong_penalty,
    resolve_reward,
)

GSM8K_TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")


def _gsm8k(completions: list[str], answers: list[str]) -> list[float]:
    return gsm8k_accuracy(["q"] * len(completions), completions, answer=answers)


# --------------------------------------------------------------------------------------------------
# gsm8k_accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Janet's ducks lay 16 eggs. She eats 3 and bakes with 4, so she has 16 - 3 - 4 = 9 eggs.\n#### 9", 9),
        ("... so she has 18 eggs.\n#### 18", 18),
        ("The answer is $1,080.", 1080),
        ("She earns 12 * 90 = 1080.\nThe answer is $1,080.00", 1080),
        ("So the total is \\boxed{42}.", 42),
        ("First \\boxed{40} was wrong, correcting: \\boxed{42}", 42),
        ("\\boxed{\\$18.00}", 18),
        ("\\boxed{18 \\text{ dollars}}", 18),
        ("\\boxed{\\frac{3}{4}}", 0.75),
        ("Answer: 3.5", 3.5),
        ("**Final Answer:** 25%", 25),
        ("The final answer is: 18 dollars.", 18),
        ("the answer is -3", -3),
        ("I think it is 7 dollars", 7),
        ("He ends up with 10 - 3 = 7", 7),
        ("Total: 1,000,000 people", 1_000_000),
        ("The change is $-5.", -5),
        ("The temperature drops to -12 degrees.", -12),
        ("She uses 3/4 of a cup", 0.75),
        ("The answer is:\n\n1{,}200", 1200),
    ],
)
def test_extract_gsm8k_answer(completion, expected):
    assert extract_gsm8k_answer(completion) == pytest.approx(expected)


def test_extract_priority_hash_beats_boxed_beats_phrase_beats_last_number():
    assert extract_gsm8k_answer("The answer is 5. \\boxed{6} then 8\n#### 7") == 7
    assert extract_gsm8k_answer("The answer is 5. \\boxed{6} and 8 more") == 6
    assert extract_gsm8k_answer("The answer is 5, and then 8 more") == 5
    assert extract_gsm8k_answer("Answer: 4. Wait, the answer is 9, so 11 left") == 9
    # a phrase without a number falls through to the last number
    assert extract_gsm8k_answer("The answer is unclear, maybe 12") == 12


def test_extract_nothing():
    assert extract_gsm8k_answer("no number here") is None
    assert extract_gsm8k_answer("") is None


def test_gsm8k_accuracy_realistic_completions():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    completions = [
        "In May she sold 48/2 = 24 clips, so 48 + 24 = 72 altogether.\n#### 72",
        "48 + 24 = 72. The answer is 72.",
        "\\boxed{72}",
        "She sold 72 clips.",
        "She sold 71 clips.",
        "The answer is 24. Then 48 + 24 = 72",  # the phrase wins over the last number
        "no number here",
        "#### 72.0",
    ]
    assert _gsm8k(completions, [ref] * len(completions)) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_gsm8k_accuracy_commas_negatives_decimals_and_bare_reference():
    assert _gsm8k(["The answer is $1,080."], ["blah\n#### 1,080"]) == [1.0]
    assert _gsm8k(["The answer is 1080"], ["#### 1,080"]) == [1.0]
    assert _gsm8k(["The answer is 108"], ["#### 1,080"]) == [0.0]
    assert _gsm8k(["So the loss is -3 dollars"], ["#### -3"]) == [1.0]
    assert _gsm8k(["So the loss is 3 dollars"], ["#### -3"]) == [0.0]
    assert _gsm8k(["Answer: 3.5"], ["3.5"]) == [1.0]  # no ####: the whole string is the reference
    assert _gsm8k(["Answer: 3.50"], ["7/2"]) == [1.0]
    assert _gsm8k(["Answer: 3.51"], ["3.5"]) == [0.0]
    assert _gsm8k(["Answer: 18"], ["18"]) == [1.0]


def test_gsm8k_accuracy_tolerance_is_relative():
    assert _gsm8k(["#### 1000000.0000001"], ["#### 1000000"]) == [1.0]
    assert _gsm8k(["#### 1000002"], ["#### 1000000"]) == [0.0]


def test_gsm8k_accuracy_reference_without_number_raises():
    with pytest.raises(ValueError, match="no number"):
        _gsm8k(["18"], ["#### n/a"])


def test_gsm8k_accuracy_ignores_unknown_kwargs():
    assert gsm8k_accuracy(["q"], ["#### 3"], answer=["#### 3"], completion_ids=[[1]], question=["q"]) == [1.0]


def test_gsm8k_dataset_answers_score_one():
    rows = [json.loads(line) for line in itertools.islice(GSM8K_TRAIN.open(), 200)]
    assert len(rows) == 200
    answers = [r["answer"] for r in rows]
    assert _gsm8k(answers, answers) == [1.0] * 200
    # and a shifted pairing (another row's answer) mostly scores 0: the check is not vacuous
    shifted = _gsm8k(answers[1:] + answers[:1], answers)
    assert sum(shifted) < 10


# --------------------------------------------------------------------------------------------------
# arithmetic_accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("7", "7", 1.0),
        (" 7", "7", 1.0),
        ("\n 7 apples", "7", 1.0),
        ("7 apples", "7", 1.0),
        ("7.", "7", 1.0),
        ("12", "1", 0.0),
        ("1", "12", 0.0),
        ("-3", "-3", 1.0),
        ("-3", "3", 0.0),
        ("3", "-3", 0.0),
        ("- 3", "-3", 0.0),
        ("The answer is 7", "7", 0.0),
        ("", "7", 0.0),
        ("007", "7", 1.0),
        ("7", " 7 ", 1.0),
    ],
)
def test_arithmetic_accuracy(completion, answer, expected):
    assert arithmetic_accuracy(["2+5="], [completion], answer=[answer], completion_ids=[[0]]) == [expected]


def test_arithmetic_accuracy_bad_answer_raises():
    with pytest.raises(ValueError):
        arithmetic_accuracy(["q"], ["7"], answer=["seven"])


# --------------------------------------------------------------------------------------------------
# math_accuracy
# --------------------------------------------------------------------------------------------------


def test_math_accuracy_latex():
    completions = [
        "We get $x = 1/2$, so the answer is $\\boxed{\\frac{1}{2}}$.",
        "The answer is \\boxed{0.5}",
        "The answer is \\boxed{\\frac{1}{3}}",
        "I give up.",
        "So \\boxed{\\frac{\\sqrt{2}}{2}}",
    ]
    solutions = ["\\frac{1}{2}", "$\\frac{1}{2}$", "\\boxed{\\frac12}", "\\frac{1}{2}", "$\\boxed{\\frac{1}{\\sqrt{2}}}$"]
    assert math_accuracy([""] * 5, completions, solution=solutions) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_math_accuracy_unparseable_gold_is_none():
    assert math_accuracy(["q", "q"], ["\\boxed{1}", "\\boxed{1}"], solution=["no math here", "1"]) == [None, 1.0]


# --------------------------------------------------------------------------------------------------
# format_reward
# --------------------------------------------------------------------------------------------------


def test_format_reward():
    completions = [
        "so 9 eggs.\n#### 9",
        "\\boxed{\\frac{1}{2}}",
        "The answer is 42.",
        "Answer: 3.5",
        "I think it is 7 dollars",
        "no number here",
        "\\boxed{}",
        "The answer is unclear",
        "####",
    ]
    assert format_reward([""] * len(completions), completions, answer=["x"] * len(completions)) == [
        1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    ]


# --------------------------------------------------------------------------------------------------
# overlong_penalty
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("l_max", "l_cache"), [(256, 64), (100, 20), (10, 0), (8, 8)])
def test_overlong_penalty_matches_trl(l_max, l_cache):
    from trl.rewards import get_soft_overlong_punishment

    lengths = sorted({0, 1, l_max - l_cache - 1, l_max - l_cache, l_max - l_cache + 1, l_max - 1, l_max, l_max + 1, 3 * l_max})
    ids = [[7] * max(n, 0) for n in lengths]
    ours = overlong_penalty([""] * len(ids), [""] * len(ids), ids, max_completion_length=l_max, soft_cache_length=l_cache)
    theirs = get_soft_overlong_punishment(l_max, l_cache)(ids)
    assert ours == theirs


def test_overlong_penalty_values():
    ids = [[0] * n for n in (10, 192, 193, 224, 256, 257)]
    assert overlong_penalty([""] * 6, [""] * 6, completion_ids=ids) == pytest.approx(
        [0.0, 0.0, -1 / 64, -0.5, -1.0, -1.0]
    )


# --------------------------------------------------------------------------------------------------
# resolve_reward / build_reward_functions
# --------------------------------------------------------------------------------------------------


def test_resolve_builtins():
    for name, fn in BUILTIN_REWARDS.items():
        assert resolve_reward(name) is fn
        assert getattr(R, name) is fn
    bound = resolve_reward("overlong_penalty", {"max_completion_length": 10, "soft_cache_length": 5})
    assert isinstance(bound, functools.partial)
    assert bound([""] * 2, ["", ""], completion_ids=[[0] * 5, [0] * 8]) == [0.0, -0.6]


def test_resolve_builtin_by_module_path():
    assert resolve_reward("grpo_swarm.node.rewards:format_reward") is format_reward


def _write_plugin(tmp_path, monkeypatch, module: str, body: str) -> None:
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_resolve_plugin(tmp_path, monkeypatch):
    _write_plugin(
        tmp_path,
        monkeypatch,
        "my_rewards_plugin_ok",
        "def brevity(prompts, completions, scale=1.0, **kw):\n"
        "    return [-scale * len(c) for c in completions]\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    def const(prompts, completions, **kw):\n"
        "        return [2.0] * len(completions)\n"
        "NOT_CALLABLE = 3\n",
    )
    fn = resolve_reward("my_rewards_plugin_ok:brevity")
    assert fn(["p"], ["abc"]) == [-3.0]
    assert resolve_reward("my_rewards_plugin_ok:brevity", {"scale": 2.0})(["p"], ["ab"]) == [-4.0]
    assert resolve_reward("my_rewards_plugin_ok:Holder.const")(["p"], ["x"]) == [2.0]
    with pytest.raises(RewardError, match="not callable"):
        resolve_reward("my_rewards_plugin_ok:NOT_CALLABLE")
    with pytest.raises(RewardError, match="no attribute 'missing'"):
        resolve_reward("my_rewards_plugin_ok:missing")
    with pytest.raises(RewardError, match=r"no parameter\(s\) \['scal'\]"):
        resolve_reward("my_rewards_plugin_ok:brevity", {"scal": 2.0})


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("no_such_reward", "built-ins are .*gsm8k_accuracy"),
        ("definitely_missing_module_xyz:fn", "cannot import module 'definitely_missing_module_xyz'"),
        ("grpo_swarm.node.rewards:nope", "no attribute 'nope'"),
        ("grpo_swarm.node.rewards:", "package.module:function"),
        (":gsm8k_accuracy", "package.module:function"),
        ("", "non-empty"),
    ],
)
def test_resolve_bad_specs(spec, pattern):
    with pytest.raises(RewardError, match=pattern) as info:
        resolve_reward(spec)
    assert isinstance(info.value, ValueError)
    if spec:
        assert repr(spec) in str(info.value)


def test_resolve_bad_args():
    with pytest.raises(RewardError, match="max_completion_len"):
        resolve_reward("overlong_penalty", {"max_completion_len": 512})  # TRL's spelling: would be swallowed
    with pytest.raises(RewardError, match="must be a dict"):
        resolve_reward("overlong_penalty", [("max_completion_length", 5)])


def test_build_reward_functions():
    fns = build_reward_functions(
        [
            {"name": "gsm8k_accuracy"},
            {"name": "format_reward", "weight": 0.5},
            {"name": "overlong_penalty", "weight": 2, "args": {"max_completion_length": 4, "soft_cache_length": 2}},
        ]
    )
    assert [f.name for f in fns] == ["gsm8k_accuracy", "format_reward", "overlong_penalty"]
    assert [f.weight for f in fns] == [1.0, 0.5, 2.0]
    assert fns[0].fn is gsm8k_accuracy
    assert fns[2].fn([""], [""], completion_ids=[[0] * 3]) == [-0.5]
    assert build_reward_functions([]) == []


@pytest.mark.parametrize(
    ("specs", "pattern"),
    [
        ([{"weight": 1.0}], "no 'name'"),
        ([{"name": "format_reward", "weigth": 1.0}], r"unknown keys \['weigth'\]"),
        (["format_reward"], "must be a dict"),
        ([{"name": "format_reward", "weight": float("nan")}], "finite"),
        ([{"name": "format_reward", "weight": "1"}], "finite"),
        ([{"name": "nope"}], "unknown reward 'nope'"),
    ],
)
def test_build_reward_functions_errors(specs, pattern):
    with pytest.raises(RewardError, match=pattern):
        build_reward_functions(specs)


# --------------------------------------------------------------------------------------------------
# compute_rewards
# --------------------------------------------------------------------------------------------------


def _const(values):
    def fn(prompts, completions, **kw):
        return list(values) if isinstance(values, list) else values

    return fn


def _batch(n=4):
    prompts = ["What is 2+2?"] * n
    completions = ["#### 4", "The answer is 5", "\\boxed{4}", "no number here"][:n]
    return prompts, completions, {"answer": ["#### 4"] * n}, [[1] * (i + 1) for i in range(n)]


def test_compute_rewards_weights_and_nansum():
    prompts, completions, columns, ids = _batch()
    fns = [
        RewardFunction("gsm8k_accuracy", gsm8k_accuracy, 1.0),
        RewardFunction("format_reward", format_reward, 0.5),
        RewardFunction("maybe", _const([None, 2.0, None, -1.0]), 2.0),
    ]
    res = compute_rewards(fns, prompts, completions, columns, ids)
    assert res.names == ["gsm8k_accuracy", "format_reward", "maybe"]
    assert res.per_function.dtype == torch.float32
    assert res.per_function.shape == (4, 3)
    expected = torch.tensor(
        [[1.0, 1.0, math.nan], [0.0, 1.0, 2.0], [1.0, 1.0, math.nan], [0.0, 0.0, -1.0]], dtype=torch.float32
    )
    torch.testing.assert_close(res.per_function, expected, equal_nan=True)
    torch.testing.assert_close(res.total, torch.tensor([1.5, 4.5, 1.5, -2.0]))


def test_compute_rewards_passes_columns_and_ids():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **kw):
        seen.update(prompts=prompts, completion_ids=completion_ids, answer=answer, extra=sorted(kw))
        return [float(len(i)) for i in completion_ids]

    prompts, completions, columns, ids = _batch()
    columns["difficulty"] = [1, 2, 3, 4]
    res = compute_rewards([RewardFunction("spy", spy)], prompts, completions, columns, ids)
    assert seen["answer"] == ["#### 4"] * 4 and seen["completion_ids"] == ids and seen["extra"] == ["difficulty"]
    torch.testing.assert_close(res.total, torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_compute_rewards_accepts_numpy_and_int_values():
    prompts, completions, columns, ids = _batch(2)
    res = compute_rewards(
        [RewardFunction("np", _const([np.float32(0.25), 3]))], prompts, completions, columns, ids
    )
    torch.testing.assert_close(res.total, torch.tensor([0.25, 3.0]))


def test_compute_rewards_empty_batch():
    res = compute_rewards([RewardFunction("f", format_reward)], [], [], {"answer": []}, [])
    assert res.per_function.shape == (0, 1) and res.total.shape == (0,)


def _raise_key(prompts, completions, **kw):
    raise KeyError("boom")


@pytest.mark.parametrize(
    ("fn", "pattern"),
    [
        (_raise_key, r"'bad' raised KeyError: 'boom'"),
        (_const(None), "'bad' returned a NoneType, not a list"),
        (lambda prompts, completions, **kw: np.zeros(4), "'bad' returned a ndarray, not a list"),
        (_const([1.0, 2.0, 3.0]), "reward function 'bad' returned 3 values for 4 completions"),
        (_const([1.0, "1.0", 0.0, 0.0]), r"'bad' returned a non-number at index 1: '1.0'"),
        (_const([1.0, 0.0, torch.tensor(1.0), 0.0]), "'bad' returned a non-number at index 2"),
        (_const([1.0, 0.0, 0.0, float("nan")]), "'bad' returned a non-finite value at index 3: nan"),
        (_const([float("-inf"), 0.0, 0.0, 0.0]), "'bad' returned a non-finite value at index 0: -inf"),
        (_const([1e39, 0.0, 0.0, 0.0]), "'bad' returned a non-finite value at index 0"),
    ],
)
def test_compute_rewards_validation_errors(fn, pattern):
    prompts, completions, columns, ids = _batch()
    fns = [RewardFunction("good", format_reward), RewardFunction("bad", fn)]
    with pytest.raises(RewardError, match=pattern):
        compute_rewards(fns, prompts, completions, columns, ids)


def test_compute_rewards_chains_exception():
    prompts, completions, columns, ids = _batch()
    with pytest.raises(RewardError) as info:
        compute_rewards([RewardFunction("bad", _raise_key)], prompts, completions, columns, ids)
    assert isinstance(info.value.__cause__, KeyError)


def test_compute_rewards_builtin_failure_names_function():
    prompts, completions, columns, ids = _batch()
    with pytest.raises(RewardError, match="'arithmetic_accuracy' raised ValueError"):
        compute_rewards([RewardFunction("arithmetic_accuracy", arithmetic_accuracy)], prompts, completions, columns, ids)


def test_compute_rewards_all_none_row():
    prompts, completions, columns, ids = _batch()
    fns = [RewardFunction("a", _const([1.0, None, 0.0, None])), RewardFunction("b", _const([None, None, 1.0, None]))]
    with pytest.raises(RewardError, match=r"completion\(s\) 1, 3"):
        compute_rewards(fns, prompts, completions, columns, ids)
    with pytest.raises(RewardError, match=r"completion\(s\) 0, 1, 2, 3"):
        compute_rewards([], prompts, completions, columns, ids)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda p, c, col, ids: (p[:3], c, col, ids), "3 prompts for 4 completions"),
        (lambda p, c, col, ids: (p, c, col, ids[:2]), "2 completion_ids for 4 completions"),
        (lambda p, c, col, ids: (p, c, {"answer": col["answer"][:3]}, ids), "column 'answer' has 3 values for 4"),
        (lambda p, c, col, ids: (p, c, {"answer": "#### 4"}, ids), "column 'answer' must be a list"),
        (lambda p, c, col, ids: (p, c, {"prompts": p}, ids), "column 'prompts' clashes"),
    ],
)
def test_compute_rewards_input_errors(mutate, pattern):
    args = mutate(*_batch())
    with pytest.raises(RewardError, match=pattern):
        compute_rewards([RewardFunction("f", format_reward)], *args)


def test_compute_rewards_isolates_mutation():
    def mutator(prompts, completions, **kw):
        completions.clear()
        return [0.0] * 4

    prompts, completions, columns, ids = _batch()
    res = compute_rewards(
        [RewardFunction("m", mutator), RewardFunction("f", format_reward)], prompts, completions, columns, ids
    )
    assert len(completions) == 4
    torch.testing.assert_close(res.total, torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_reward_function_validation():
    with pytest.raises(RewardError, match="not callable"):
        RewardFunction("x", 3)
    with pytest.raises(RewardError, match="finite"):
        RewardFunction("x", format_reward, float("inf"))
    assert RewardFunction("x", format_reward, 2).weight == 2.0


def test_math_accuracy_works_off_main_thread():
    # math-verify's signal-based timeouts fail outside the main thread; we must not turn that into 0.0
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(math_accuracy(["q"], ["\\boxed{0.5}"], solution=["\\frac{1}{2}"])))
    t.start()
    t.join(timeout=60)
    assert out == [[1.0]]
