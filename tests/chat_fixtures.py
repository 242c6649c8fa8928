"""A small chat tokenizer built offline for the `format: messages` tests: a byte-level BPE trained on
a tiny corpus, saved as a transformers PreTrainedTokenizerFast directory with a Jinja chat template
(with {% generation %} markers, without them, or none), and conversations with the pieces they
render to, so a test can build the expected token ids and loss mask without the template."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
VOCAB_SIZE = 320  # a model for this tokenizer needs at least this many embeddings

_ASSISTANT_BODY = (
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
    "<|end|>"
)


# Written as an expression: transformers renders with trim_blocks, which drops a newline after a tag.
NEWLINE = "{{ '\\n' }}"


def chat_template(markers: bool) -> str:
    """A ChatML-like template: system/user/tool turns as <|role|>content<|end|>, a newline after each
    turn, the tools' schemas in a first system turn; `markers` puts {% generation %} around what
    the assistant writes (its content or tool calls and its <|end|>)."""
    body = "{% generation %}" + _ASSISTANT_BODY + "{% endgeneration %}" if markers else _ASSISTANT_BODY
    return (
        "{{ bos_token }}"
        "{% if tools %}<|system|>tools: {{ tools | tojson }}<|end|>" + NEWLINE + "{% endif %}"
        "{% for m in messages %}"
        "{% if m.role == 'assistant' %}<|assistant|>" + body + NEWLINE +
        "{% elif m.role in ['system', 'user', 'tool'] %}<|{{ m.role }}|>{{ m.content }}<|end|>" + NEWLINE +
        "{% else %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


CORPUS = [
    "You are a terse assistant.", "What is the capital of France?", "Paris.", "hello there, how are you?",
    "I am fine, thank you.", "Translate cat to French.", "chat", "What is two plus two?", "four",
    "get_weather", "city", "Berlin", "sunny, 21 degrees", "It is sunny and 21 degrees in Berlin.",
] * 4


def save_chat_tokenizer(directory: Path, markers: bool | None = True) -> Path:
    """Train and save the tokenizer into `directory`; markers None saves it without a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if markers is not None:
        hf.chat_template = chat_template(markers)
    hf.save_pretrained(str(directory))
    return directory


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}

# Conversations, and the pieces each renders to: (text, whether it is the assistant's).
CONVERSATIONS = [
    (
        {"messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Translate cat to French."},
            {"role": "assistant", "content": "chat"},
        ]},
        [("<s>", False), ("<|system|>You are a terse assistant.<|end|>\n", False),
         ("<|user|>What is the capital of France?<|end|>\n", False), ("<|assistant|>", False), ("Paris.<|end|>", True),
         ("\n", False), ("<|user|>Translate cat to French.<|end|>\n", False), ("<|assistant|>", False),
         ("chat<|end|>", True), ("\n", False)],
    ),
    (
        {"messages": [
            {"role": "user", "content": "What is the weather in Berlin?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}]},
            {"role": "tool", "content": "sunny, 21 degrees"},
            {"role": "assistant", "content": "It is sunny and 21 degrees in Berlin."},
        ], "tools": [WEATHER_TOOL]},
        [("<s>", False), ("<|system|>tools: " + json.dumps([WEATHER_TOOL]) + "<|end|>\n", False),
         ("<|user|>What is the weather in Berlin?<|end|>\n", False), ("<|assistant|>", False),
         ('[call get_weather {"city": "Berlin"}]<|end|>', True), ("\n", False),
         ("<|tool|>sunny, 21 degrees<|end|>\n", False), ("<|assistant|>", False),
         ("It is sunny and 21 degrees in Berlin.<|end|>", True), ("\n", False)],
    ),
]


def expected_sample(hf_tokenizer, pieces) -> tuple[list[int], list[bool]]:
    """Token ids of the pieces, each encoded on its own, and whether each token is the assistant's.
    Every piece boundary is next to a special token, where the tokenizer splits anyway, so this is
    the tokenization of the whole text."""
    ids, assistant = [], []
    for text, is_assistant in pieces:
        piece_ids = hf_tokenizer.encode(text, add_special_tokens=False)
        ids += piece_ids
        assistant += [is_assistant] * len(piece_ids)
    return ids, assistant


def write_chat_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
