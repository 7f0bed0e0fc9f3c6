"""Tests for grpo_swarm.node.data: loaders, clear errors, arithmetic task, rendering, sampler."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from grpo_swarm.node import data
from grpo_swarm.node.data import (
    DatasetError,
    PromptExample,
    PromptSampler,
    arithmetic_examples,
    load_dataset_spec,
    load_gsm8k,
    load_hf_dataset,
    load_jsonl,
    render_prompt,
)
from grpo_swarm.node.models import build_char_tokenizer

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason="GSM8K data not present")

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_gsm8k_row(i: int = 0) -> str:
    return json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"})


# ------------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gsm8k_train():
    return load_gsm8k(GSM8K_DIR / "train.jsonl")


@needs_gsm8k
def test_gsm8k_real_train_rows(gsm8k_train):
    assert len(gsm8k_train) == 7473
    first = gsm8k_train[0]
    assert first.index == 0
    assert isinstance(first.prompt, tuple)
    system, user = first.prompt
    assert system["role"] == "system" and "####" in system["content"]
    assert user["role"] == "user"
    assert user["content"].startswith("Natalia sold clips to 48 of her friends in April")
    assert first.columns == {
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    }
    assert [e.index for e in gsm8k_train[:5]] == [0, 1, 2, 3, 4]
    assert all(re.search(r"####\s*-?[\d,.]+\s*$", e.columns["answer"]) for e in gsm8k_train)


@needs_gsm8k
def test_gsm8k_default_location_and_test_split(monkeypatch, tmp_path):
    monkeypatch.delenv(data.GSM8K_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # found from this module's folder even outside the repo
    test = load_gsm8k(split="test")
    assert len(test) == 1319
    assert test[0].prompt[1]["content"].startswith("Janet")
    assert test[0].columns["answer"].endswith("#### 18")


def test_gsm8k_env_var_and_folder_path(monkeypatch, tmp_path):
    write_lines(tmp_path / "train.jsonl", [good_gsm8k_row(0), "", good_gsm8k_row(1)])
    monkeypatch.setenv(data.GSM8K_ENV, str(tmp_path))
    got = load_gsm8k()
    assert [e.columns["answer"].split("#### ")[1] for e in got] == ["1", "2"]
    assert [e.index for e in got] == [0, 1]  # the blank line is skipped, indices stay dense
    assert load_gsm8k(tmp_path) == got  # a folder holding {split}.jsonl
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "test.jsonl"))):
        load_gsm8k(split="test")  # env var set but file missing: no silent fallback


def test_gsm8k_search_upward(monkeypatch, tmp_path):
    monkeypatch.delenv(data.GSM8K_ENV, raising=False)
    target = tmp_path / "shared" / "data" / "gsm8k"
    target.mkdir(parents=True)
    write_lines(target / "train.jsonl", [good_gsm8k_row(5)])
    deep = tmp_path / "repo" / "sub"
    deep.mkdir(parents=True)
    assert data.find_gsm8k_file("train", [deep]) == target / "train.jsonl"
    with pytest.raises(DatasetError, match="GRPO_SWARM_GSM8K_DIR"):
        data.find_gsm8k_file("nosuchsplit", [deep])


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"question": "q", "answer": "#### 1"', "invalid JSON"),
        ('{"question": "q"}', "missing 'answer'"),
        ('{"answer": "#### 3"}', "missing 'question'"),
        ('{"question": "q", "answer": "three"}', "no '####'"),
        ('{"question": "  ", "answer": "#### 3"}', "'question' is empty"),
        ('{"question": "q", "answer": 3}', "not a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_gsm8k_malformed_row_names_file_and_line(tmp_path, bad_line, problem):
    path = write_lines(tmp_path / "bad.jsonl", [good_gsm8k_row(0), good_gsm8k_row(1), bad_line, good_gsm8k_row(3)])
    with pytest.raises(DatasetError) as info:
        load_gsm8k(path)
    msg = str(info.value)
    assert "bad.jsonl:3:" in msg
    assert problem in msg


def test_missing_files_are_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for load in (load_gsm8k, load_jsonl):
        with pytest.raises(DatasetError, match=re.escape(str(missing))):
            load(missing)
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DatasetError, match="no examples"):
        load_jsonl(empty)
    assert issubclass(DatasetError, ValueError)


# ------------------------------------------------------------------------------------------------
# Generic jsonl and HF datasets
# ------------------------------------------------------------------------------------------------


def test_load_jsonl_text_and_messages(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "2+2=", "answer": "4", "level": 1}),
            json.dumps({"prompt": messages, "answer": "hello"}),
        ],
    )
    a, b = load_jsonl(path)
    assert a == PromptExample(0, "2+2=", {"answer": "4", "level": 1})
    assert b.index == 1
    assert b.prompt == tuple(messages)
    assert b.columns == {"answer": "hello"}

    other = write_lines(tmp_path / "q.jsonl", [json.dumps({"q": "x", "prompt": "kept as a column"})])
    (ex,) = load_jsonl(other, prompt_column="q")
    assert ex.prompt == "x" and ex.columns == {"prompt": "kept as a column"}


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ({"answer": "1"}, "missing prompt column 'prompt'"),
        ({"prompt": ""}, "is empty"),
        ({"prompt": 5}, "list of messages"),
        ({"prompt": []}, "list of messages"),
        ({"prompt": [{"role": "user"}]}, "message 0 has no string 'content'"),
        ({"prompt": [{"role": "user", "content": "a"}, "b"]}, "message 1 is str"),
    ],
)
def test_load_jsonl_malformed(tmp_path, bad_row, problem):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"prompt": "ok"}), json.dumps(bad_row)])
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    assert "g.jsonl:2:" in str(info.value)
    assert problem in str(info.value)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    rows = [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2*3=", "answer": "6"},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "flat"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(root / "dict"))
    chat = [{"messages": [{"role": "user", "content": "hey"}], "answer": "x"}]
    datasets.Dataset.from_list(chat).save_to_disk(str(root / "chat"))
    return root


def test_load_hf_dataset_from_disk(hf_dir):
    flat = load_hf_dataset(str(hf_dir / "flat"), "train")
    assert [(e.index, e.prompt, dict(e.columns)) for e in flat] == [
        (0, "1+1=", {"answer": "2"}),
        (1, "2*3=", {"answer": "6"}),
    ]
    test = load_hf_dataset(str(hf_dir / "dict"), "test")
    assert [e.prompt for e in test] == ["1+1="]
    (chat,) = load_hf_dataset(str(hf_dir / "chat"), "train", prompt_column="messages")
    assert chat.prompt == ({"role": "user", "content": "hey"},)
    with pytest.raises(DatasetError, match="no split 'validation'"):
        load_hf_dataset(str(hf_dir / "dict"), "validation")
    with pytest.raises(DatasetError, match=r"row 0: missing prompt column 'question'"):
        load_hf_dataset(str(hf_dir / "flat"), "train", prompt_column="question")


def test_load_hf_dataset_missing_local_path(tmp_path):
    missing = str(tmp_path / "no_such_dataset")
    with pytest.raises(DatasetError, match=re.escape(missing)):
        load_hf_dataset(missing, "train")


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------


def test_arithmetic_deterministic_and_correct():
    a = arithmetic_examples(300, seed=7, max_operand=20, ops="+-*")
    assert a == arithmetic_examples(300, seed=7, max_operand=20, ops="+-*")
    assert a != arithmetic_examples(300, seed=8, max_operand=20, ops="+-*")
    assert [e.index for e in a] == list(range(300))
    ops_seen = Counter()
    for e in a:
        m = re.fullmatch(r"(\d+)([+\-*])(\d+)=", e.prompt)
        assert m, e.prompt
        x, op, y = int(m[1]), m[2], int(m[3])
        assert 0 <= x <= 20 and 0 <= y <= 20
        ops_seen[op] += 1
        assert e.columns == {"answer": str(eval(e.prompt[:-1]))}
    assert set(ops_seen) == {"+", "-", "*"}
    assert min(ops_seen.values()) > 60  # roughly uniform over 300 draws


def test_arithmetic_defaults_fit_char_tokenizer():
    tok = build_char_tokenizer()
    ex = arithmetic_examples(50, seed=0)
    operands = set()
    for e in ex:
        assert re.fullmatch(r"\d\+\d=", e.prompt)
        operands.update(int(c) for c in e.prompt[::2])
        ids = tok(e.prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == e.prompt
        assert tok.unk_token_id not in ids
    assert operands <= set(range(10)) and len(operands) > 5
    assert arithmetic_examples(0, seed=0) == []
    with pytest.raises(ValueError):
        arithmetic_examples(3, seed=0, ops="/")


# ------------------------------------------------------------------------------------------------
# load_dataset_spec
# ------------------------------------------------------------------------------------------------


def test_spec_arithmetic_variants():
    train = load_dataset_spec("arithmetic", seed=3, size=40)
    assert train == arithmetic_examples(40, 3)
    assert load_dataset_spec("arithmetic", split="test", seed=3, size=40) == arithmetic_examples(40, 4)
    assert load_dataset_spec("arithmetic:50", seed=1, size=10) == arithmetic_examples(10, 1, 50, "+")
    assert load_dataset_spec("arithmetic:5:*-", seed=2, size=10) == arithmetic_examples(10, 2, 5, "*-")
    for bad in ("arithmetic:x", "arithmetic:5:/", "arithmetic:5:+:9", "arithmetic:-1"):
        with pytest.raises(DatasetError, match=re.escape(repr(bad))):
            load_dataset_spec(bad)


def test_spec_jsonl_and_hf_disk(tmp_path, hf_dir):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "9-4=", "answer": "5"})])
    assert load_dataset_spec(str(path)) == [PromptExample(0, "9-4=", {"answer": "5"})]
    assert [e.prompt for e in load_dataset_spec(str(hf_dir / "flat"))] == ["1+1=", "2*3="]
    assert [e.prompt for e in load_dataset_spec(str(hf_dir / "dict"), split="test")] == ["1+1="]
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "missing.jsonl"))):
        load_dataset_spec(str(tmp_path / "missing.jsonl"))
    spec = str(tmp_path / "not_a_dataset")
    with pytest.raises(DatasetError, match=re.escape(repr(spec))):
        load_dataset_spec(spec)
    with pytest.raises(DatasetError, match="empty dataset spec"):
        load_dataset_spec("  ")


@needs_gsm8k
def test_spec_gsm8k(monkeypatch):
    monkeypatch.setenv(data.GSM8K_ENV, str(GSM8K_DIR))
    test = load_dataset_spec("gsm8k", split="test")
    assert len(test) == 1319
    assert test[0].prompt[0]["role"] == "system"


# ------------------------------------------------------------------------------------------------
# render_prompt
# ------------------------------------------------------------------------------------------------

MESSAGES = ({"role": "system", "content": "sys"}, {"role": "user", "content": "1+2="})


def test_render_without_chat_template():
    tok = build_char_tokenizer()
    assert not tok.chat_template
    assert render_prompt(tok, PromptExample(0, "3+4=", {})) == "3+4="
    assert render_prompt(tok, PromptExample(0, MESSAGES, {})) == "sys\n1+2=\n"
    trailing_empty = ({"role": "user", "content": "a"}, {"role": "user", "content": ""})
    assert render_prompt(tok, PromptExample(0, trailing_empty, {})) == "a\n"
    assert render_prompt(tok, "bare=") == "bare="
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, "x", use_chat_template=True)


def test_render_with_chat_template():
    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    assert render_prompt(tok, PromptExample(0, "3+4=", {})) == "<user>3+4=\n<assistant>"
    assert render_prompt(tok, PromptExample(0, MESSAGES, {})) == "<system>sys\n<user>1+2=\n<assistant>"
    assert render_prompt(tok, PromptExample(0, MESSAGES, {}), use_chat_template=False) == "sys\n1+2=\n"
    assert render_prompt(tok, PromptExample(0, "3+4=", {}), use_chat_template=False) == "3+4="
    assert render_prompt(tok, "3+4=", use_chat_template=True) == "<user>3+4=\n<assistant>"


# ------------------------------------------------------------------------------------------------
# PromptSampler
# ------------------------------------------------------------------------------------------------


def _indices(batch):
    return [e.index for e in batch]


def test_sampler_deterministic_and_covers_each_epoch():
    ex = arithmetic_examples(10, seed=0)
    s1, s2, s3 = PromptSampler(ex, seed=5), PromptSampler(ex, seed=5), PromptSampler(ex, seed=6)
    run1 = [_indices(s1.next_batch(4)) for _ in range(10)]  # 40 draws = 4 epochs
    run2 = [_indices(s2.next_batch(4)) for _ in range(10)]
    run3 = [_indices(s3.next_batch(4)) for _ in range(10)]
    assert run1 == run2
    assert run1 != run3
    flat = [i for b in run1 for i in b]
    epochs = [flat[k : k + 10] for k in range(0, 40, 10)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert len({tuple(e) for e in epochs}) > 1  # each epoch is a fresh permutation
    assert s1.state_dict()["epoch"] == 4 and s1.state_dict()["position"] == 0
    assert s1.next_batch(0) == []
    assert len(s1.next_batch(25)) == 25  # a batch larger than the dataset spans epochs


def test_sampler_state_resume():
    ex = arithmetic_examples(7, seed=1)
    s = PromptSampler(ex, seed=11)
    s.next_batch(5)
    s.next_batch(5)  # mid second epoch
    state = s.state_dict()
    assert state["seed"] == 11 and state["epoch"] == 1 and state["position"] == 3
    expected = [_indices(s.next_batch(3)) for _ in range(6)]

    resumed = PromptSampler(ex, seed=0)  # seed comes from the state
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert [_indices(resumed.next_batch(3)) for _ in range(6)] == expected

    with pytest.raises(ValueError):
        PromptSampler(ex[:3], seed=0).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptSampler([], seed=0)
