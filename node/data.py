"""Prompt datasets for GRPO: load, generate, render and sample the prompts a node trains on.

Every source is turned into a list of :class:`PromptExample` (an index, the prompt — plain text or
chat messages — and the other dataset columns that reward functions receive, e.g. ``answer``):

* :func:`load_gsm8k` — GSM8K jsonl files (``question`` / ``answer`` with ``#### N``), found via
  ``GRPO_SWARM_GSM8K_DIR`` or by searching upward for ``shared/data/gsm8k/{split}.jsonl``.
* :func:`load_jsonl` — any jsonl file with a prompt column (a string or a list of messages).
* :func:`load_hf_dataset` — a ``datasets`` dataset: a folder saved with ``save_to_disk`` or a name
  ``datasets.load_dataset`` can resolve (local files or the cache; nothing here forces a download).
* :func:`arithmetic_examples` — a synthetic, verifiable arithmetic task ("3+4=" -> "7"), generated
  deterministically from a seed; it fits the tiny character-level tokenizer.
* :func:`load_dataset_spec` — one string (as in configs / on the command line) to any of the above.

:func:`render_prompt` turns an example into the text fed to the model (chat template when the
tokenizer has one), and :class:`PromptSampler` walks seeded permutations epoch after epoch with a
small state dict for checkpoint resume.

Every malformed input raises :class:`DatasetError`, whose message names the file (or dataset), the
line (or row) and what is wrong.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

GSM8K_ENV = "GRPO_SWARM_GSM8K_DIR"
GSM8K_SUBDIR = Path("shared") / "data" / "gsm8k"
GSM8K_SYSTEM_PROMPT = (
    "Solve the math problem. Reason step by step, then write the final numeric answer "
    "on the last line after '####', e.g. '#### 42'."
)
ARITHMETIC_OPS = "+-*"

Messages = tuple[dict, ...]
Prompt = Union[str, Messages]


class DatasetError(ValueError):
    """A dataset could not be loaded: missing file, malformed row, unknown spec.

    The message names the file (or dataset), the line (or row) and the problem.
    """


@dataclass(frozen=True)
class PromptExample:
    """One prompt to train on.

    ``prompt`` is plain text or chat messages (``{"role": ..., "content": ...}`` dicts);
    ``columns`` are the other dataset fields, passed to reward functions (e.g. ``{"answer": "72"}``).
    Because ``columns`` is a plain dict (picklable), examples compare by value but are not hashable.
    """

    index: int
    prompt: Prompt
    columns: Mapping[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Row validation (shared by every loader)
# ----------------------------------------------------------------------------------------------


def _parse_messages(value: Any, where: str, column: str) -> Messages:
    """Validate a list of chat messages; return them as a tuple of plain dicts."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DatasetError(f"{where}: {column!r} must be a non-empty string or list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise DatasetError(f"{where}: {column!r} message {i} is {type(msg).__name__}, not a dict")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise DatasetError(f"{where}: {column!r} message {i} has no string 'role'")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: {column!r} message {i} has no string 'content'")
        messages.append(dict(msg))
    return tuple(messages)


def _parse_prompt(value: Any, where: str, column: str) -> Prompt:
    if value is None:
        raise DatasetError(f"{where}: missing prompt column {column!r}")
    if isinstance(value, str):
        if not value.strip():
            raise DatasetError(f"{where}: prompt column {column!r} is empty")
        return value
    return _parse_messages(value, where, column)


def example_from_row(row: Any, index: int, prompt_column: str, where: str) -> PromptExample:
    """Build a :class:`PromptExample` from a dict row; every key but ``prompt_column`` is a column."""
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if prompt_column not in row:
        raise DatasetError(f"{where}: missing prompt column {prompt_column!r}")
    prompt = _parse_prompt(row[prompt_column], where, prompt_column)
    columns = {k: v for k, v in row.items() if k != prompt_column}
    return PromptExample(index=index, prompt=prompt, columns=columns)


def _read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    """Yield ``(line_number, parsed_object)`` for each non-blank line; clear errors otherwise."""
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc


# ----------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------


def find_gsm8k_file(split: str = "train", start_dirs: Sequence[Path] | None = None) -> Path:
    """Where the GSM8K ``{split}.jsonl`` file is.

    ``$GRPO_SWARM_GSM8K_DIR/{split}.jsonl`` when the variable is set (no fallback), else the first
    ``shared/data/gsm8k/{split}.jsonl`` found walking up from each of ``start_dirs`` (default: the
    current directory, then this file's folder).
    """
    filename = f"{split}.jsonl"
    env = os.environ.get(GSM8K_ENV)
    if env:
        candidate = Path(env).expanduser() / filename
        if not candidate.is_file():
            raise DatasetError(f"GSM8K file not found: {candidate} (from ${GSM8K_ENV})")
        return candidate
    if start_dirs is None:
        start_dirs = [Path.cwd(), Path(__file__).resolve().parent]
    searched = []
    for start in start_dirs:
        start = Path(start).resolve()
        for d in (start, *start.parents):
            candidate = d / GSM8K_SUBDIR / filename
            if candidate.is_file():
                return candidate
        searched.append(str(start))
    raise DatasetError(
        f"GSM8K {filename} not found: no {GSM8K_SUBDIR / filename} above {', '.join(searched)}; "
        f"set ${GSM8K_ENV} to the folder holding it"
    )


def gsm8k_prompt(question: str) -> Messages:
    """The chat messages for one GSM8K question."""
    return (
        {"role": "system", "content": GSM8K_SYSTEM_PROMPT},
        {"role": "user", "content": question},
    )


def _gsm8k_example(row: Any, index: int, where: str) -> PromptExample:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if key not in row or row[key] is None:
            raise DatasetError(f"{where}: missing {key!r}")
        if not isinstance(row[key], str):
            raise DatasetError(f"{where}: {key!r} is {type(row[key]).__name__}, not a string")
        if not row[key].strip():
            raise DatasetError(f"{where}: {key!r} is empty")
    if "####" not in row["answer"]:
        raise DatasetError(f"{where}: 'answer' has no '####' final answer")
    return PromptExample(index=index, prompt=gsm8k_prompt(row["question"]), columns={"answer": row["answer"]})


def load_gsm8k(path: str | os.PathLike | None = None, split: str = "train") -> list[PromptExample]:
    """Load GSM8K as chat prompts (system instruction + question); columns ``{"answer": raw}``.

    ``path`` is a jsonl file, or a folder holding ``{split}.jsonl``; default: :func:`find_gsm8k_file`.
    """
    if path is None:
        file = find_gsm8k_file(split)
    else:
        file = Path(path)
        if file.is_dir():
            file = file / f"{split}.jsonl"
    examples: list[PromptExample] = []
    for lineno, row in _read_jsonl(file):
        examples.append(_gsm8k_example(row, len(examples), f"{file}:{lineno}"))
    if not examples:
        raise DatasetError(f"{file}: no examples")
    return examples


# ----------------------------------------------------------------------------------------------
# Generic jsonl and Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def load_jsonl(path: str | os.PathLike, prompt_column: str = "prompt") -> list[PromptExample]:
    """Load a jsonl file: ``prompt_column`` is a string or a list of messages; other keys are columns."""
    file = Path(path)
    examples: list[PromptExample] = []
    for lineno, row in _read_jsonl(file):
        examples.append(example_from_row(row, len(examples), prompt_column, f"{file}:{lineno}"))
    if not examples:
        raise DatasetError(f"{file}: no examples")
    return examples


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or os.sep + os.sep in name


def load_hf_dataset(name: str, split: str, prompt_column: str = "prompt") -> list[PromptExample]:
    """Load a ``datasets`` dataset: a ``save_to_disk`` folder (``load_from_disk``) or a name for
    ``datasets.load_dataset(name, split=split)`` (local files / cache). Failures -> DatasetError."""
    import datasets  # slow import, only when needed

    try:
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"dataset {name!r} has no split {split!r} (splits: {sorted(ds)})")
                ds = ds[split]
        elif _looks_like_path(name):
            raise DatasetError(f"dataset {name!r}: no such directory")
        else:
            ds = datasets.load_dataset(name, split=split)
    except DatasetError:
        raise
    except Exception as exc:  # the datasets library raises many unrelated types
        raise DatasetError(f"cannot load dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}") from exc
    examples = [
        example_from_row(row, i, prompt_column, f"dataset {name!r} split {split!r} row {i}")
        for i, row in enumerate(ds)
    ]
    if not examples:
        raise DatasetError(f"dataset {name!r} split {split!r}: no examples")
    return examples


# ----------------------------------------------------------------------------------------------
# Synthetic arithmetic
# ----------------------------------------------------------------------------------------------


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def arithmetic_examples(n: int, seed: int, max_operand: int = 9, ops: str = "+") -> list[PromptExample]:
    """``n`` prompts like ``"3+4="`` with columns ``{"answer": "7"}``, deterministic given ``seed``.

    Operands are uniform in ``[0, max_operand]``; the operator is uniform over ``ops`` (from "+-*").
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    if not ops or any(op not in ARITHMETIC_OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {ARITHMETIC_OPS!r}, got {ops!r}")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        a = rng.randint(0, max_operand)
        op = rng.choice(ops)
        b = rng.randint(0, max_operand)
        examples.append(PromptExample(index=i, prompt=f"{a}{op}{b}=", columns={"answer": str(_apply(op, a, b))}))
    return examples


def _parse_arithmetic_spec(spec: str) -> tuple[int, str]:
    """``arithmetic[:MAX[:OPS]]`` -> ``(max_operand, ops)``."""
    parts = spec.split(":")
    if parts[0] != "arithmetic" or len(parts) > 3:
        raise DatasetError(f"bad dataset spec {spec!r}: expected arithmetic, arithmetic:MAX or arithmetic:MAX:OPS")
    max_operand, ops = 9, "+"
    if len(parts) >= 2:
        try:
            max_operand = int(parts[1])
        except ValueError:
            raise DatasetError(f"bad dataset spec {spec!r}: MAX {parts[1]!r} is not an integer") from None
        if max_operand < 0:
            raise DatasetError(f"bad dataset spec {spec!r}: MAX must be >= 0")
    if len(parts) == 3:
        ops = parts[2]
        if not ops or any(op not in ARITHMETIC_OPS for op in ops):
            raise DatasetError(f"bad dataset spec {spec!r}: OPS must be a non-empty subset of {ARITHMETIC_OPS!r}")
    return max_operand, ops


def load_dataset_spec(spec: str, split: str = "train", seed: int = 0, size: int = 10000) -> list[PromptExample]:
    """Load a dataset from a spec string.

    * ``gsm8k`` -> :func:`load_gsm8k` (``split``);
    * ``arithmetic``, ``arithmetic:MAX``, ``arithmetic:MAX:OPS`` -> ``size`` synthetic examples with
      seed ``seed`` for the train split and ``seed + 1`` for any other split;
    * ``*.jsonl`` -> :func:`load_jsonl`;
    * anything else (a ``save_to_disk`` folder, a dataset name) -> :func:`load_hf_dataset`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty dataset spec {spec!r}")
    spec = spec.strip()
    if spec == "gsm8k":
        return load_gsm8k(split=split)
    if spec == "arithmetic" or spec.startswith("arithmetic:"):
        max_operand, ops = _parse_arithmetic_spec(spec)
        return arithmetic_examples(size, seed + (0 if split == "train" else 1), max_operand, ops)
    if spec.endswith(".jsonl"):
        return load_jsonl(spec)
    try:
        return load_hf_dataset(spec, split)
    except DatasetError as exc:
        raise DatasetError(f"dataset spec {spec!r} matches nothing loadable: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Rendering and sampling
# ----------------------------------------------------------------------------------------------


def prompt_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes a single user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def render_prompt(tokenizer: Any, example: PromptExample | Prompt, use_chat_template: bool | None = None) -> str:
    """The text fed to the model for ``example`` (a PromptExample or a bare prompt).

    With a chat template (``tokenizer.chat_template`` truthy) and ``use_chat_template`` not False:
    the messages rendered by ``apply_chat_template(..., add_generation_prompt=True)``.
    Otherwise plain text: a string prompt as is; messages as their contents joined by ``"\\n"``,
    plus a trailing ``"\\n"`` when the last message's content is not empty.
    """
    prompt = example.prompt if isinstance(example, PromptExample) else example
    if use_chat_template is True and not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    if use_chat_template is not False and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    contents = [m["content"] for m in prompt]
    text = "\n".join(contents)
    if contents and contents[-1]:
        text += "\n"
    return text


def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"grpo-swarm-sampler:{seed}:{epoch}").shuffle(order)
    return order


class PromptSampler:
    """Walk seeded random permutations of ``examples``, epoch after epoch.

    Every example is drawn once per epoch; the order depends only on ``(seed, epoch)``, so the same
    seed gives the same batches, and :meth:`state_dict` / :meth:`load_state_dict` resume exactly.
    """

    def __init__(self, examples: Sequence[PromptExample], seed: int = 0):
        if len(examples) == 0:
            raise ValueError("PromptSampler needs at least one example")
        self.examples = list(examples)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None

    def _current_order(self) -> list[int]:
        if self._order is None:
            self._order = _epoch_permutation(len(self.examples), self.seed, self.epoch)
        return self._order

    def next_batch(self, n: int) -> list[PromptExample]:
        """The next ``n`` examples (a batch may span an epoch boundary)."""
        if n < 0:
            raise ValueError(f"batch size must be >= 0, got {n}")
        batch = []
        while len(batch) < n:
            order = self._current_order()
            take = min(n - len(batch), len(order) - self.position)
            batch.extend(self.examples[i] for i in order[self.position : self.position + take])
            self.position += take
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
                self._order = None
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_examples": len(self.examples)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        num = state.get("num_examples")
        if num is not None and int(num) != len(self.examples):
            raise ValueError(f"sampler state is for {num} examples, this sampler has {len(self.examples)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.examples):
            raise ValueError(f"bad sampler state: epoch {epoch}, position {position}")
        self.seed = int(state["seed"])
        self.epoch = epoch
        self.position = position
        self._order = None
