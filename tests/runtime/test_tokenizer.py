"""lorafusion.runtime.tokenizer: the byte tokenizer, its save/load, and local Hugging Face tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafusion.runtime.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, HFTokenizer, load_tokenizer


TEXTS = ["", "hello, world", "12+7=19", "héllo wörld", "日本語 ✓ 🙂", "line\nbreak\t\x00"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= token < 256 for token in ids)
    assert tokenizer.decode(ids) == text


@given(st.text())
@settings(max_examples=50, deadline=None)
def test_round_trip_any_text(text: str) -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens() -> None:
    tokenizer = ByteTokenizer()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    assert tokenizer.vocab_size == 259
    ids = [tokenizer.bos_token_id, *tokenizer.encode("ab"), tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>ab<eos><pad>"


def test_special_token_inside_a_multibyte_character_does_not_merge_the_halves() -> None:
    tokenizer = ByteTokenizer()
    euro = tokenizer.encode("€")  # three bytes
    # Each invalid fragment becomes U+FFFD; the bytes around the special token are not rejoined.
    assert tokenizer.decode([*euro[:1], tokenizer.eos_token_id, *euro[1:]]) == "\ufffd" * 3
    assert tokenizer.decode([*euro, tokenizer.eos_token_id, *euro]) == "€€"


@given(st.lists(st.integers(min_value=-5, max_value=400)), st.booleans())
@settings(max_examples=100, deadline=None)
def test_decode_never_raises(ids: list[int], skip_special_tokens: bool) -> None:
    assert isinstance(ByteTokenizer().decode(ids, skip_special_tokens=skip_special_tokens), str)


def test_decode_invalid_utf8_and_out_of_vocabulary_ids() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([0xFF, ord("a")]) == "\ufffda"
    assert tokenizer.decode([ord("a"), 259, ord("b"), -1]) == "a\ufffdb\ufffd"


def test_save_and_load(tmp_path: Path) -> None:
    ByteTokenizer().save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / BYTE_TOKENIZER_FILE).read_text())["type"] == "byte"
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path / "tok")), ByteTokenizer)


def test_none_gives_the_byte_tokenizer() -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absent.*not a directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}.*none of tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / BYTE_TOKENIZER_FILE).write_text('{"type": "bpe"}')
    with pytest.raises(ValueError, match="wrong"):
        load_tokenizer(tmp_path / "wrong")


@pytest.fixture(scope="module")
def word_level_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Hugging Face fast tokenizer (word level, five tokens, no pad token), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer.save_pretrained(str(directory))
    return directory


def test_hugging_face_tokenizer(word_level_tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(word_level_tokenizer_dir)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.encode("hello world") == [3, 4]  # no bos/eos added
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (1, 2, 5)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # no pad token: falls back to eos
    assert tokenizer.decode([1, 3, 4, 2]) == "hello world"
    assert tokenizer.decode([3, 99, -1]) == "hello"

    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = load_tokenizer(tmp_path / "saved")
    assert isinstance(reloaded, HFTokenizer) and reloaded.encode("world hello") == [4, 3]
