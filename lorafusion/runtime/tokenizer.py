"""Tokenizers of the training runtime: a built-in byte tokenizer, or a local Hugging Face one.

Both expose the same five members, which is all the runtime uses: `encode(text)` (no special
tokens), `decode(ids, skip_special_tokens=True)`, `pad_token_id`, `bos_token_id`, `eos_token_id`
and `vocab_size`; and `save_pretrained(directory)`, so a checkpoint carries its tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BYTE_TOKENIZER_FILE = "lorafusion_tokenizer.json"
# A Hugging Face tokenizer directory holds at least one of these.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    """Built-in tokenizer that needs no download: UTF-8 bytes 0..255, then specials."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    _SPECIAL_TOKEN_TEXT = {pad_token_id: "<pad>", bos_token_id: "<bos>", eos_token_id: "<eos>"}

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`; no special tokens."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; never raises.

        Invalid UTF-8 and ids outside the vocabulary (a model's vocabulary may be larger) become
        U+FFFD. Special tokens are dropped, or written as <pad>, <bos>, <eos> when not skipped.
        """
        pieces: list[str] = []
        pending_bytes = bytearray()
        for token in ids:
            token = int(token)  # also accepts numpy and 0-d torch integers
            if 0 <= token < 256:
                pending_bytes.append(token)
                continue
            # A special token ends a byte run: decoding each run separately keeps a multi-byte
            # character split by a special token from swallowing it.
            pieces.append(pending_bytes.decode("utf-8", errors="replace"))
            pending_bytes.clear()
            if token in self._SPECIAL_TOKEN_TEXT:
                if not skip_special_tokens:
                    pieces.append(self._SPECIAL_TOKEN_TEXT[token])
            else:
                pieces.append("\ufffd")
        pieces.append(pending_bytes.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write lorafusion_tokenizer.json into `directory` (created if needed) for load_tokenizer,
        and the same tokenizer in Hugging Face's format (tokenizer.json, tokenizer_config.json),
        so that `transformers.AutoTokenizer.from_pretrained(directory)` loads it too."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.as_hf_tokenizer().save_pretrained(str(directory))
        description = {"type": "byte", "vocab_size": self.vocab_size}
        (directory / BYTE_TOKENIZER_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")

    def as_hf_tokenizer(self):
        """This tokenizer as a transformers PreTrainedTokenizerFast: the same ids (byte b is id b,
        then <pad>, <bos>, <eos>), and `tokenizer(text)` starts with <bos> as `lorafusion generate`
        and the training samples do."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        # Byte-level BPE without merges: every byte, shown as GPT-2's printable stand-in, is one token.
        vocabulary = {char: byte for byte, char in _byte_stand_ins().items()}
        tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        specials = [self._SPECIAL_TOKEN_TEXT[i] for i in sorted(self._SPECIAL_TOKEN_TEXT)]
        tokenizer.add_special_tokens(specials)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", self.bos_token_id)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _byte_stand_ins() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class HFTokenizer:
    """A transformers tokenizer behind the runtime's tokenizer interface.

    pad_token_id falls back to eos_token_id (Llama tokenizers define no pad token); bos_token_id
    is None for tokenizers without one (Qwen2), and then samples start without it.
    """

    def __init__(self, tokenizer: Any, source: str) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {source} has no eos token; the runtime ends every sample with one")
        self.hf_tokenizer = tokenizer
        self.source = source  # where it was loaded from, for messages naming it
        self.bos_token_id: int | None = tokenizer.bos_token_id
        self.eos_token_id: int = tokenizer.eos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        # len() counts added tokens, which the tokenizer's own vocab_size leaves out.
        self.vocab_size: int = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are dropped rather than raising."""
        valid_ids = [int(token) for token in ids if 0 <= int(token) < self.vocab_size]
        return self.hf_tokenizer.decode(valid_ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the wrapped tokenizer in its own format, which load_tokenizer reads back."""
        self.hf_tokenizer.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf_tokenizer).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """None -> ByteTokenizer(); a directory with lorafusion_tokenizer.json -> ByteTokenizer; otherwise
    transformers.AutoTokenizer.from_pretrained(path, local_files_only=True) wrapped in HFTokenizer.

    Raises ValueError naming the path when the tokenizer cannot be loaded; nothing is downloaded.
    """
    if path is None:
        return ByteTokenizer()
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"cannot load tokenizer from {directory}: not a directory")
    description_file = directory / BYTE_TOKENIZER_FILE
    if description_file.is_file():
        try:
            description = json.loads(description_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot load tokenizer from {description_file}: {error}") from error
        if not isinstance(description, dict) or description.get("type") != "byte":
            raise ValueError(f"cannot load tokenizer from {description_file}: expected {{\"type\": \"byte\"}}")
        return ByteTokenizer()

    if not any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        raise ValueError(
            f"cannot load tokenizer from {directory}: it has none of {', '.join(HF_TOKENIZER_FILES)} "
            f"(nor {BYTE_TOKENIZER_FILE})"
        )
    from transformers import AutoTokenizer  # imported here: slow, and unused with the byte tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # transformers raises many types here; all mean "cannot load this directory"
        raise ValueError(f"cannot load tokenizer from {directory}: {error}") from error
    return HFTokenizer(tokenizer, str(directory))
