"""The built-in byte tokenizer, saved, loads with transformers' AutoTokenizer and gives the ids
lorafusion trains on: byte b is id b, <pad> <bos> <eos> are 256 257 258, a prompt starts with <bos>."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lorafusion.runtime.tokenizer import ByteTokenizer, load_tokenizer

TEXTS = ["12+7=", "reverse: dyg ->", "héllo wörld  \n\t ✓ 😀", "", "  two  spaces "]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("byte")
    ByteTokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("text", TEXTS)
def test_auto_tokenizer_encodes_and_decodes_as_the_runtime(saved, text):
    tokenizer, ours = AutoTokenizer.from_pretrained(saved, local_files_only=True), ByteTokenizer()
    assert tokenizer(text)["input_ids"] == [ours.bos_token_id] + ours.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)
    ids = [ours.bos_token_id, *ours.encode(text), ours.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text


def test_special_tokens_and_size_match(saved):
    tokenizer, ours = AutoTokenizer.from_pretrained(saved, local_files_only=True), ByteTokenizer()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    assert len(tokenizer) == ours.vocab_size


def test_lorafusion_still_loads_its_own_tokenizer(saved):
    assert isinstance(load_tokenizer(saved), ByteTokenizer)
