"""Reward functions for GRPO: built-ins, a registry for user plugins, and a validating combiner.

Its job: turn a batch of decoded completions into one reward per completion, loudly.

* Every reward function has TRL's signature
  ``fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]``: one value
  per completion, ``None`` meaning "not applicable". ``columns`` holds the dataset columns repeated
  per completion (e.g. ``answer``) plus ``completion_ids`` (token ids without padding); functions
  accept and ignore keyword arguments they do not use.
* Built-ins: :func:`gsm8k_accuracy`, :func:`arithmetic_accuracy`, :func:`math_accuracy`,
  :func:`format_reward`, :func:`overlong_penalty` (DAPO's soft overlong punishment, same formula as
  ``trl.rewards.get_soft_overlong_punishment``).
* :func:`resolve_reward` maps a built-in name or a ``"package.module:function"`` plugin spec to a
  callable; :func:`build_reward_functions` turns config specs into weighted :class:`RewardFunction`.
* :func:`compute_rewards` calls every function, validates what it returns (type, length, real and
  finite values), and combines them like TRL: ``total = nansum_f(weight_f * value_f)``. Anything
  wrong raises :class:`RewardError` naming the culprit; nothing is silently skipped.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BUILTIN_REWARDS",
    "RewardError",
    "RewardFunction",
    "RewardResult",
    "arithmetic_accuracy",
    "build_reward_functions",
    "compute_rewards",
    "extract_gsm8k_answer",
    "format_reward",
    "gsm8k_accuracy",
    "math_accuracy",
    "overlong_penalty",
    "parse_number",
    "resolve_reward",
]


class RewardError(ValueError):
    """A reward function, its spec, or its output is unusable."""


# --------------------------------------------------------------------------------------------------
# Number extraction (GSM8K-style answers)
# --------------------------------------------------------------------------------------------------

# A number as models write it: optional minus (not a binary minus after an operand), optional "$",
# thousands separators, decimals, an optional "/denominator". Units / "%" / a trailing "." are simply
# not part of the match.
_NUMBER_RE = re.compile(
    r"""
    (?:(?<![\w.)\]}])(?<![\d.)\]}]\s)(?P<sign>[-−]))?      # a sign, not a binary minus ("5-3", "10 - 3")
    (?:\\?\$\s?(?P<sign2>[-−])?)?                          # $ or LaTeX \$, then maybe a sign ($-5)
    (?P<int>\d+(?:,\d{3})*(?!\d)|(?=\.\d))                 # 18 / 1,080 / (nothing before .5)
    (?P<dec>\.\d+)?
    (?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?                     # 3/4
    """,
    re.VERBOSE,
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_HASH_RE = re.compile(r"####")
_BOXED_RE = re.compile(r"\\boxed\s*\{")
_PHRASE_RE = re.compile(r"\banswer\b[\s*]*(?:is\b|:|=)", re.IGNORECASE)


def _normalise_latex(text: str) -> str:
    """Rewrite the LaTeX spellings of plain numbers: ``\\frac{3}{4}`` → ``3/4``, ``1{,}080`` → ``1,080``."""
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = text.replace("{,}", ",")
    return re.sub(r"(\d)\\,(\d{3})", r"\1,\2", text)


def _match_value(m: re.Match) -> float | None:
    negative = bool(m.group("sign")) != bool(m.group("sign2"))
    value = float((m.group("int") or "0").replace(",", "") + (m.group("dec") or ""))
    if m.group("den") is not None:
        den = float(m.group("den"))
        if den == 0:
            return None
        value /= den
    return -value if negative else value


def _numbers(text: str) -> list[float]:
    """All numbers in ``text``, in order (LaTeX fractions and separators normalised)."""
    values = (_match_value(m) for m in _NUMBER_RE.finditer(_normalise_latex(text)))
    return [v for v in values if v is not None]


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (``"$1,080.00 dollars"`` → 1080.0, ``"-3/4"`` → -0.75), or None."""
    found = _numbers(text)
    return found[0] if found else None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` in order, with nested braces matched."""
    out = []
    for m in _BOXED_RE.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[start:i])
                    break
    return out


def _hash_answer(text: str) -> float | None:
    """The number after the last ``####`` that is followed by one."""
    for m in reversed(list(_HASH_RE.finditer(text))):
        value = parse_number(text[m.end() :].lstrip().split("\n", 1)[0])
        if value is not None:
            return value
    return None


def _boxed_answer(text: str) -> float | None:
    """The number in the last ``\\boxed{...}`` that contains one."""
    for content in reversed(_boxed_contents(text)):
        value = parse_number(content)
        if value is not None:
            return value
    return None


def _phrase_answer(text: str) -> float | None:
    """The number after the last "the answer is" / "final answer:" / "Answer:" that has one."""
    for m in reversed(list(_PHRASE_RE.finditer(text))):
        value = parse_number(text[m.end() :].lstrip().split("\n", 1)[0])
        if value is not None:
            return value
    return None


def extract_gsm8k_answer(text: str) -> float | None:
    """A completion's final numeric answer, or None when it contains no number.

    Priority: ``#### N``; the last ``\\boxed{N}``; the last "the answer is N" / "final answer: N" /
    "Answer: N" (case-insensitive); the last number in the text.
    """
    for extract in (_hash_answer, _boxed_answer, _phrase_answer):
        value = extract(text)
        if value is not None:
            return value
    found = _numbers(text)
    return found[-1] if found else None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


# --------------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------------


def gsm8k_accuracy(prompts: list[str], completions: list[str], answer: list[str], **kw) -> list[float]:
    """1.0 when the completion's final number equals GSM8K's reference (the number after ``####``).

    Without ``####`` the whole ``answer`` string is the reference. A reference with no number raises
    ``ValueError`` (a data bug, not something to train on).
    """
    rewards = []
    for completion, ref in zip(completions, answer, strict=True):
        ref_text = ref.rsplit("####", 1)[1] if "####" in ref else ref
        gold = parse_number(ref_text)
        if gold is None:
            raise ValueError(f"GSM8K reference answer has no number: {ref!r}")
        pred = extract_gsm8k_answer(completion)
        rewards.append(1.0 if pred is not None and _close(pred, gold) else 0.0)
    return rewards


_LEADING_INT_RE = re.compile(r"^\s*(-?\d+)(?!\d)")


def arithmetic_accuracy(prompts: list[str], completions: list[str], answer: list[str], **kw) -> list[float]:
    """1.0 when the completion starts (after whitespace) with the full integer ``answer``.

    ``answer`` is the integer as a string ("7", "-3"); one that is not an integer raises ``ValueError``.
    """
    rewards = []
    for completion, ref in zip(completions, answer, strict=True):
        gold = int(str(ref).strip())
        m = _LEADING_INT_RE.match(completion)
        rewards.append(1.0 if m is not None and int(m.group(1)) == gold else 0.0)
    return rewards


def math_accuracy(prompts: list[str], completions: list[str], solution: list[str], **kw) -> list[float | None]:
    """1.0 when math-verify finds the completion's answer equal to ``solution``'s; None when the gold
    solution cannot be parsed; 0.0 when parsing/verifying the completion raises.

    math-verify's default extraction and timeouts are used. Its timeouts rely on ``signal.alarm``, which
    only works in the main thread, so elsewhere they are disabled (as TRL does) instead of failing.
    """
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()
    parse_kw = {} if in_main else {"parsing_timeout": None}
    verify_kw = {} if in_main else {"timeout_seconds": None}

    gold_cache: dict[str, list] = {}
    rewards: list[float | None] = []
    for completion, sol in zip(completions, solution, strict=True):
        if sol not in gold_cache:
            try:
                gold_cache[sol] = parse(sol, **parse_kw)
            except Exception:
                gold_cache[sol] = []
        gold = gold_cache[sol]
        if not gold:
            rewards.append(None)
            continue
        try:
            rewards.append(1.0 if verify(gold, parse(completion, **parse_kw), **verify_kw) else 0.0)
        except Exception:
            rewards.append(0.0)
    return rewards


def format_reward(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """1.0 when the completion states a final answer as ``#### N``, ``\\boxed{...}`` or "answer is N" /
    "Answer: N"; else 0.0."""
    return [
        1.0
        if _hash_answer(c) is not None or any(b.strip() for b in _boxed_contents(c)) or _phrase_answer(c) is not None
        else 0.0
        for c in completions
    ]


def overlong_penalty(
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    max_completion_length: int = 256,
    soft_cache_length: int = 64,
    **kw,
) -> list[float]:
    """DAPO's soft overlong punishment (Eq. 13), as ``trl.rewards.get_soft_overlong_punishment``:
    0 up to ``L_max - L_cache`` tokens, a linear ramp down to -1 at ``L_max``, -1 beyond."""
    l_max, l_cache = max_completion_length, soft_cache_length
    rewards = []
    for ids in completion_ids:
        length = len(ids)
        if length <= l_max - l_cache:
            rewards.append(0.0)
        elif length <= l_max:
            rewards.append((l_max - l_cache - length) / l_cache)
        else:
            rewards.append(-1.0)
    return rewards


BUILTIN_REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "gsm8k_accuracy": gsm8k_accuracy,
    "arithmetic_accuracy": arithmetic_accuracy,
    "math_accuracy": math_accuracy,
    "format_reward": format_reward,
    "overlong_penalty": overlong_penalty,
}


# --------------------------------------------------------------------------------------------------
# Registry and plugins
# --------------------------------------------------------------------------------------------------


def _load_plugin(spec: str) -> Callable:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise RewardError(f"reward spec {spec!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward spec {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def _check_args(name: str, fn: Callable, args: dict) -> None:
    """Reject args the function has no named parameter for (its **kwargs would swallow them silently)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    named = {
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(args) - named)
    if unknown:
        raise RewardError(
            f"reward {name!r} has no parameter(s) {unknown} (its parameters: {sorted(named)})"
        )


def resolve_reward(name: str, args: dict | None = None) -> Callable:
    """A built-in reward by name, or a plugin ``"package.module:function"``; with ``args``, the function
    with those keyword arguments bound (``functools.partial``)."""
    if not isinstance(name, str) or not name.strip():
        raise RewardError(f"reward name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[name]
    elif ":" in name:
        fn = _load_plugin(name)
    else:
        raise RewardError(
            f"unknown reward {name!r}: built-ins are {sorted(BUILTIN_REWARDS)}; "
            "a plugin is written 'package.module:function'"
        )
    if args is None:
        return fn
    if not isinstance(args, dict):
        raise RewardError(f"reward {name!r}: args must be a dict, got {type(args).__name__}")
    _check_args(name, fn, args)
    return functools.partial(fn, **args)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real)


@dataclass
class RewardFunction:
    """A resolved reward function with the label and weight it contributes under."""

    name: str
    fn: Callable
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RewardError(f"reward function name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise RewardError(f"reward function {self.name!r}: fn is not callable ({self.fn!r})")
        if not _is_real(self.weight) or not math.isfinite(self.weight):
            raise RewardError(f"reward function {self.name!r}: weight must be a finite number, got {self.weight!r}")
        self.weight = float(self.weight)


_SPEC_KEYS = {"name", "weight", "args"}


def build_reward_functions(specs: list[dict]) -> list[RewardFunction]:
    """``[{"name": ..., "weight": 1.0, "args": {...}}, ...]`` → weighted, resolved reward functions."""
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise RewardError(f"reward spec #{i} must be a dict, got {type(spec).__name__}")
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            raise RewardError(f"reward spec #{i} ({spec.get('name')!r}): unknown keys {unknown}")
        if "name" not in spec:
            raise RewardError(f"reward spec #{i} has no 'name'")
        name = spec["name"]
        fn = resolve_reward(name, spec.get("args"))
        out.append(RewardFunction(name=name, fn=fn, weight=spec.get("weight", 1.0)))
    return out


# --------------------------------------------------------------------------------------------------
# Combining
# --------------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """``per_function`` [N, F] float32 (NaN = not applicable), ``total`` [N], ``names`` [F]."""

    per_function: torch.Tensor
    total: torch.Tensor
    names: list[str]


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_RESERVED = ("prompts", "completions", "completion_ids")


def _check_lengths(
    prompts: Sequence, completions: Sequence, columns: dict[str, list], completion_ids: Sequence
) -> int:
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(f"got {len(prompts)} prompts for {n} completions")
    if len(completion_ids) != n:
        raise RewardError(f"got {len(completion_ids)} completion_ids for {n} completions")
    for key, col in columns.items():
        if key in _RESERVED:
            raise RewardError(f"column {key!r} clashes with a reward-function argument")
        if not isinstance(col, (list, tuple)):
            raise RewardError(f"column {key!r} must be a list, got {type(col).__name__}")
        if len(col) != n:
            raise RewardError(f"column {key!r} has {len(col)} values for {n} completions")
    return n


def _call_one(rf: RewardFunction, n: int, kwargs: dict) -> list[float]:
    """Call one reward function and validate its output; None becomes NaN."""
    # Shallow copies, so one function mutating its inputs cannot change what the next one sees.
    call_kwargs = {k: list(v) for k, v in kwargs.items()}
    try:
        out = rf.fn(**call_kwargs)
    except Exception as e:
        raise RewardError(f"reward function {rf.name!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward function {rf.name!r} returned a {type(out).__name__}, not a list")
    if len(out) != n:
        raise RewardError(f"reward function {rf.name!r} returned {len(out)} values for {n} completions")
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(math.nan)
            continue
        if not _is_real(v):
            raise RewardError(
                f"reward function {rf.name!r} returned a non-number at index {i}: {v!r} ({type(v).__name__})"
            )
        f = float(v)
        if not math.isfinite(f) or abs(f) > _FLOAT32_MAX:
            raise RewardError(f"reward function {rf.name!r} returned a non-finite value at index {i}: {v!r}")
        values.append(f)
    return values


def compute_rewards(
    functions: list[RewardFunction],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
    completion_ids: list[list[int]],
) -> RewardResult:
    """Call every reward function on the batch, validate, and combine: ``total = nansum(w * r)``."""
    n = _check_lengths(prompts, completions, columns, completion_ids)
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
    per_function = torch.full((n, len(functions)), math.nan, dtype=torch.float32)
    for j, rf in enumerate(functions):
        per_function[:, j] = torch.tensor(_call_one(rf, n, kwargs), dtype=torch.float32)
    all_none = per_function.isnan().all(dim=1).nonzero().flatten().tolist()
    if all_none:
        shown = ", ".join(map(str, all_none[:10])) + (", ..." if len(all_none) > 10 else "")
        raise RewardError(
            f"no reward function returned a value for completion(s) {shown} "
            f"(functions: {[rf.name for rf in functions]})"
        )
    weights = torch.tensor([rf.weight for rf in functions], dtype=torch.float32)
    total = (per_function * weights.unsqueeze(0)).nansum(dim=1)
    return RewardResult(per_function=per_function, total=total, names=[rf.name for rf in functions])
