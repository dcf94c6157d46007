"""The simulator's tokenizer is deterministic across processes and prefix-stable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdroute.sim.tokenizer import (
    BOS_ID,
    FIRST_PIECE_ID,
    OUTPUT_WORDS,
    Tokenizer,
    render_chat,
)


def test_golden_ids_are_stable() -> None:
    # Golden values: a change here changes every block hash the simulator publishes.
    assert Tokenizer().encode("Hello world!") == [1, 23270, 19826, 18543, 19425]


def test_same_ids_in_another_process_with_other_hash_seed() -> None:
    code = "from pdroute.sim.tokenizer import Tokenizer; print(Tokenizer().encode('a b, c'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "123"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == str(Tokenizer().encode("a b, c"))


def test_prefix_of_text_gives_prefix_of_ids() -> None:
    tok = Tokenizer()
    long = tok.encode("The quick brown fox jumps over the lazy dog")
    short = tok.encode("The quick brown fox")
    assert long[: len(short)] == short
    assert len(long) > len(short)


def test_special_tokens_and_id_range() -> None:
    tok = Tokenizer(vocab_size=1000)
    ids = tok.encode("x y z", add_special_tokens=True)
    assert ids[0] == BOS_ID
    assert all(FIRST_PIECE_ID <= t < 1000 for t in ids[1:])
    assert tok.encode("x", add_special_tokens=False)[0] != BOS_ID


def test_output_tokens_detokenize_and_retokenize_exactly() -> None:
    tok = Tokenizer()
    ids = [tok.output_token(7, i) for i in range(21)]
    assert ids == [tok.output_token(7, i) for i in range(21)]
    assert all(tok.is_output_token(t) for t in ids)
    text = tok.decode(ids)
    words = text.split(" ")
    assert len(words) == 11 and all(w in OUTPUT_WORDS for w in words)
    # The reply re-tokenizes to exactly the generated ids (multi-turn prefix reuse).
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode("assistant\n" + text, add_special_tokens=False)[2:] == ids
    assert [tok.output_token(8, i) for i in range(21)] != ids


def test_chat_template_is_deterministic_and_validates() -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    text = render_chat(msgs)
    assert (
        text
        == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    with pytest.raises(ValueError, match="role"):
        render_chat([{"content": "x"}])
    with pytest.raises(ValueError, match="object"):
        render_chat(["x"])
