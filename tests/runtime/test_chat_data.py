"""format: messages. Conversations rendered by the tokenizer's own chat template (a small BPE
tokenizer built offline, with and without {% generation %} markers) carry the loss on exactly the
assistant's tokens, checked token by token against the pieces the template writes; system prompts,
tools and tool calls pass through the template; bad conversations are named by line or row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from chat_fixtures import CONVERSATIONS, expected_sample, save_chat_tokenizer, write_chat_jsonl
from lorafusion.runtime.data import IGNORE_INDEX, DataError, load_samples
from lorafusion.runtime.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module", params=[True, False], ids=["generation-markers", "prefix-fallback"])
def tokenizer(request, tmp_path_factory):
    return load_tokenizer(save_chat_tokenizer(tmp_path_factory.mktemp("tok"), markers=request.param))


def test_loss_on_exactly_the_assistant_tokens(tokenizer, tmp_path: Path) -> None:
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [conversation for conversation, _ in CONVERSATIONS])
    samples = load_samples(path, "messages", tokenizer, max_seq_len=512)
    assert [s.record for s in samples] == [1, 2]
    for sample, (_, pieces) in zip(samples, CONVERSATIONS):
        ids, assistant = expected_sample(tokenizer.hf_tokenizer, pieces)
        assert list(sample.input_ids) == ids
        for position, (token, label, is_assistant) in enumerate(zip(ids, sample.labels, assistant)):
            assert label == (token if is_assistant else IGNORE_INDEX), (position, tokenizer.hf_tokenizer.decode([token]))
    # The template's own rendering, tokenized, is the sample: system prompt, tools and tool calls included.
    conversation = CONVERSATIONS[1][0]
    text = tokenizer.hf_tokenizer.apply_chat_template(conversation["messages"], tools=conversation["tools"], tokenize=False)
    assert "get_weather" in text and list(samples[1].input_ids) == tokenizer.hf_tokenizer.encode(text, add_special_tokens=False)


def test_truncation_keeps_the_assistant_tokens_before_the_cut(tokenizer, tmp_path: Path) -> None:
    conversation, pieces = CONVERSATIONS[0]
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [conversation])
    ids, assistant = expected_sample(tokenizer.hf_tokenizer, pieces)
    first_assistant = assistant.index(True)
    [sample] = load_samples(path, "messages", tokenizer, max_seq_len=first_assistant + 2)
    assert list(sample.input_ids) == ids[: first_assistant + 2]
    assert sample.num_target_tokens == 2 and sample.truncated
    [whole] = load_samples(path, "messages", tokenizer, max_seq_len=len(ids))  # fills it exactly: not cut
    assert list(whole.input_ids) == ids and not whole.truncated
    with pytest.raises(DataError, match=rf"chat\.jsonl, line 1: no assistant token within max_seq_len={first_assistant} "):
        load_samples(path, "messages", tokenizer, max_seq_len=first_assistant)


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "four"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": "hi"}, 'field "messages" must be an array, got a string'),
        ({"messages": []}, 'field "messages" is an empty array; a conversation needs at least one message'),
        ({"messages": [USER, "four"]}, "message 1 must be an object with role and content, got a string"),
        ({"messages": [USER, {"content": "four"}]}, 'message 1 needs a string "role", got null'),
        ({"messages": [USER]}, 'no message with role "assistant": nothing to train on'),
        ({"messages": [USER, ASSISTANT], "tools": {"name": "f"}}, 'field "tools" must be an array, got an object'),
        ({"messages": [{"role": "robot", "content": "beep"}, ASSISTANT]}, "the chat template refuses this conversation: unknown role robot"),
        # a template renders any content, a number or an object as Python would print it: refused instead
        ({"messages": [{"role": "user", "content": 5}, ASSISTANT]}, 'message 0 "content" must be a string or a list of content parts (objects), got a number'),
        ({"messages": [USER, {"role": "assistant", "content": {"text": "four"}}]}, 'message 1 "content" must be a string or a list of content parts (objects), got an object'),
        ({"messages": [USER, {"role": "assistant", "content": ["four"]}]}, 'message 1 "content" must be a string or a list of content parts (objects), got an array holding a string'),
        ({"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "four"}, None]}]}, 'message 1 "content" must be a string or a list of content parts (objects), got an array holding null'),
        ({"conversation": [USER, ASSISTANT]}, 'missing field "messages" (format messages needs "messages")'),
    ],
)
def test_bad_conversations_are_named_by_line(tokenizer, tmp_path: Path, record: dict, message: str) -> None:
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0][0], record])
    with pytest.raises(DataError) as caught:
        load_samples(path, "messages", tokenizer, max_seq_len=512)
    assert str(caught.value) == f"{path}, line 2: {message}"


def test_an_assistant_turn_first_trains_on_its_text_only(tokenizer, tmp_path: Path) -> None:
    # Neither the bos nor the <|assistant|> header the template writes before the first message is the assistant's.
    conversation = {"messages": [{"role": "assistant", "content": "Paris."}, USER, ASSISTANT]}
    pieces = [("<s>", False), ("<|assistant|>", False), ("Paris.<|end|>", True), ("\n", False),
              ("<|user|>hi<|end|>\n", False), ("<|assistant|>", False), ("four<|end|>", True), ("\n", False)]
    [sample] = load_samples(write_chat_jsonl(tmp_path / "chat.jsonl", [conversation]), "messages", tokenizer, max_seq_len=512)
    ids, assistant = expected_sample(tokenizer.hf_tokenizer, pieces)
    assert list(sample.input_ids) == ids
    assert list(sample.labels) == [token if is_assistant else IGNORE_INDEX for token, is_assistant in zip(ids, assistant)]


def test_null_tools_in_jsonl_are_no_tools(tokenizer, tmp_path: Path) -> None:
    # datasets' to_json writes null for a row without tools, as a table holds it: absent, not refused.
    conversation, pieces = CONVERSATIONS[0]
    [sample] = load_samples(write_chat_jsonl(tmp_path / "chat.jsonl", [conversation | {"tools": None}]), "messages", tokenizer, 512)
    assert list(sample.input_ids) == expected_sample(tokenizer.hf_tokenizer, pieces)[0]


def test_columns_rename_the_messages_field(tokenizer, tmp_path: Path) -> None:
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [{"conversation": c["messages"]} for c, _ in CONVERSATIONS[:1]])
    [sample] = load_samples(path, "messages", tokenizer, max_seq_len=512, columns={"messages": "conversation"})
    assert list(sample.input_ids) == expected_sample(tokenizer.hf_tokenizer, CONVERSATIONS[0][1])[0]


def test_conversations_in_a_save_to_disk_dataset(tokenizer, tmp_path: Path) -> None:
    # Arrow gives every message every key (null where a message has none): nulls are absent keys.
    import datasets
    records = [conversation for conversation, _ in reversed(CONVERSATIONS)]  # from_list takes the columns of the first
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert datasets.load_from_disk(str(tmp_path / "saved"))[1]["tools"] is None
    from_jsonl = load_samples(write_chat_jsonl(tmp_path / "chat.jsonl", records), "messages", tokenizer, 512)
    from_disk = load_samples(tmp_path / "saved", "messages", tokenizer, 512)
    assert [(s.input_ids, s.labels) for s in from_disk] == [(s.input_ids, s.labels) for s in from_jsonl]


def test_no_chat_template_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0][0]])
    bare = load_tokenizer(save_chat_tokenizer(tmp_path / "bare", markers=None))
    with pytest.raises(DataError) as caught:
        load_samples(path, "messages", bare, max_seq_len=512)
    assert str(caught.value) == (
        f"{path}: format messages needs the tokenizer's chat template, and {tmp_path / 'bare'} has none "
        "(no chat_template in its tokenizer_config.json, nor a chat_template.jinja)"
    )
    with pytest.raises(DataError, match=r"chat\.jsonl: format messages needs a tokenizer with a chat template, and the built-in byte tokenizer has none"):
        load_samples(path, "messages", ByteTokenizer(), max_seq_len=512)


def test_a_template_that_rewrites_earlier_turns_needs_markers(tmp_path: Path) -> None:
    # Shows only the last assistant turn in full: turn 1 renders differently once turn 3 follows.
    directory = save_chat_tokenizer(tmp_path / "tok", markers=False)
    config_path = directory / "chat_template.jinja"
    template = config_path.read_text() if config_path.is_file() else json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]
    rewritten = template.replace("{% if m.content %}{{ m.content }}{% endif %}", "{% if loop.last %}{{ m.content }}{% endif %}")
    assert rewritten != template
    if config_path.is_file():
        config_path.write_text(rewritten)
    else:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": rewritten}))
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0][0]])
    with pytest.raises(DataError) as caught:
        load_samples(path, "messages", load_tokenizer(directory), max_seq_len=512)
    assert str(caught.value) == (
        f"{path}, line 1: the chat template renders the conversation up to message 2 differently once later turns follow, so the "
        "assistant's tokens cannot be told apart; use a template with {% generation %} markers"
    )


def test_missing_jinja2_names_the_extra(tokenizer, tmp_path: Path, monkeypatch) -> None:
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0][0]])
    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` then raises ImportError
    with pytest.raises(DataError) as caught:
        load_samples(path, "messages", tokenizer, max_seq_len=512)
    assert str(caught.value) == f"{path}: format messages needs jinja2 to render the chat template: pip install 'lorafusion[data]'"
