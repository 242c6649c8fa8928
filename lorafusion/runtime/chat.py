"""format: messages. A conversation ({"messages": [{"role", "content"}, ...]}, as TRL and OpenAI's
fine-tuning take it, with optional "tools" and assistant "tool_calls") is rendered by the
tokenizer's own chat template, and the loss is taken on the assistant turns only.

Which tokens are the assistant's:

* A template with generation markers (`{% generation %}...{% endgeneration %}` around what the
  assistant writes) says so itself: transformers' `return_assistant_tokens_mask`.
* Otherwise (most templates), turn by turn: for the assistant message i, the template renders the
  conversation up to message i with the generation prompt (`add_generation_prompt=True`: the
  text that precedes what the assistant writes) and up to message i included; the assistant's
  text is what the second adds to the first, trailing whitespace excluded (the newline after an
  end-of-turn token is layout, which the model never has to write). Both must be beginnings of
  the whole conversation's rendering, which holds for templates that render earlier turns the
  same whatever follows; a template that does not (one that drops earlier reasoning, say) needs
  generation markers, and its records are refused with a message saying so.

Either way a token is the assistant's when its characters overlap the assistant's text, which is
transformers' rule for the markers. No bos or eos is added: the template writes what the model
needs. The sample is cut at max_seq_len.
"""

from __future__ import annotations

import re
from pathlib import Path

from .data import IGNORE_INDEX, DataError, Record, Sample, json_type
from .data_sources import DATA_EXTRA_HINT

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' own test for the markers
TEMPLATE_FAILURES = (TypeError, ValueError, KeyError, IndexError, AttributeError)
_CONTENT_PROBE = "\x00lorafusion-assistant-content\x00"  # text no conversation holds


class ChatRenderer:
    """Turns the conversations of one dataset into samples with an HF tokenizer's chat template."""

    def __init__(self, hf_tokenizer, template_error: type[Exception]) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.template_error = template_error  # jinja2's, raised by a template's raise_exception
        self.has_markers = bool(GENERATION_MARKER.search(hf_tokenizer.get_chat_template()))

    @classmethod
    def of(cls, tokenizer, data_path: Path) -> ChatRenderer:
        """The renderer of the runtime's `tokenizer`; DataError naming the data file when it has
        no chat template or cannot map tokens to characters."""
        hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
        if hf_tokenizer is None:
            raise DataError(
                data_path, None, "format messages needs a tokenizer with a chat template, and the built-in byte "
                "tokenizer has none: set tokenizer to a local Hugging Face tokenizer directory that has one",
            )
        source = getattr(tokenizer, "source", "the tokenizer")
        if not getattr(hf_tokenizer, "chat_template", None):
            raise DataError(
                data_path, None, f"format messages needs the tokenizer's chat template, and {source} has none "
                "(no chat_template in its tokenizer_config.json, nor a chat_template.jinja)",
            )
        if not getattr(hf_tokenizer, "is_fast", False):
            raise DataError(
                data_path, None, f"format messages needs a fast tokenizer (tokenizer.json) to find the assistant's "
                f"tokens, and {source} is a slow one",
            )
        try:
            from jinja2 import TemplateError  # what transformers renders chat templates with
        except ImportError:
            raise DataError(data_path, None, f"format messages needs jinja2 to render the chat template: {DATA_EXTRA_HINT}") from None
        return cls(hf_tokenizer, TemplateError)

    def sample(self, record: Record, max_seq_len: int) -> Sample:
        """The record's conversation as a sample: labels are the token ids on the assistant's tokens
        and IGNORE_INDEX elsewhere; DataError naming the record for a malformed conversation, one
        the template refuses, or one whose assistant turns all lie beyond max_seq_len."""
        messages = _checked_messages(record)
        tools = record.fields.get("tools")
        try:
            if self.has_markers:
                input_ids, mask = self._marked(messages, tools)
            else:
                input_ids, mask = self._by_prefixes(record, messages, tools)
        except DataError:
            raise
        except self.template_error as error:
            raise record.error(f"the chat template refuses this conversation: {_one_line(error)}") from None
        except TEMPLATE_FAILURES as error:
            raise record.error(f"the chat template cannot render this conversation: {_one_line(error)}") from None
        labels = [token if in_mask else IGNORE_INDEX for token, in_mask in zip(input_ids, mask)]
        sample = Sample(
            record=record.number, input_ids=tuple(input_ids[:max_seq_len]), labels=tuple(labels[:max_seq_len]),
            truncated=len(input_ids) > max_seq_len,
        )
        if sample.num_target_tokens == 0:
            raise record.error(f"no assistant token within max_seq_len={max_seq_len} (the conversation has {len(input_ids)} tokens)")
        return sample

    def _marked(self, messages: list[dict], tools) -> tuple[list[int], list[int]]:
        encoded = self.hf_tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(encoded["input_ids"]), list(encoded["assistant_masks"])

    def _by_prefixes(self, record: Record, messages: list[dict], tools) -> tuple[list[int], list[int]]:
        def render(upto: int, generation_prompt: bool) -> str:
            if upto == 0:
                return ""
            return self.hf_tokenizer.apply_chat_template(
                messages[:upto], tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )

        def before_assistant(index: int) -> str:
            """The text the template writes before assistant message `index`'s own."""
            if index > 0:
                return render(index, True)
            # transformers renders no empty conversation: for a first message, the text before a probe put in
            # its place (bos, a default system prompt, the assistant header), checked below like any other.
            probe = self.hf_tokenizer.apply_chat_template(
                [{"role": "assistant", "content": _CONTENT_PROBE}], tools=tools, tokenize=False
            )
            if _CONTENT_PROBE not in probe:
                raise record.error(
                    "the chat template does not write a first assistant message's content as given, so the assistant's "
                    "tokens cannot be told apart; use a template with {% generation %} markers"
                )
            return probe[: probe.index(_CONTENT_PROBE)]

        whole = render(len(messages), False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = before_assistant(index), render(index + 1, False)
            if not (through.startswith(before) and whole.startswith(through)):
                raise record.error(
                    f"the chat template renders the conversation up to message {index} differently once later turns follow, so the "
                    "assistant's tokens cannot be told apart; use a template with {% generation %} markers"
                )
            spans.append((len(before), max(len(before), len(through.rstrip()))))
        encoded = self.hf_tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(start < end_span and end > start_span for start_span, end_span in spans)) for start, end in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), mask


def _checked_messages(record: Record) -> list[dict]:
    """The conversation's messages, each an object with a string role and a string (or content parts)
    or null content; keys with a null value are
    dropped (a table has every key in every message; transformers 5 drops them too)."""
    messages = record.fields["messages"]
    if not messages:
        raise record.error('field "messages" is an empty array; a conversation needs at least one message')
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise record.error(f"message {index} must be an object with role and content, got {json_type(message)}")
        if not isinstance(message.get("role"), str):
            raise record.error(f'message {index} needs a string "role", got {json_type(message.get("role"))}')
        # A template prints any other value as Python would: a number or an object would train as its repr.
        content = message.get("content")
        if isinstance(content, list):
            odd = [part for part in content if not isinstance(part, dict)]
            got = f"an array holding {json_type(odd[0])}" if odd else None
        else:
            got = None if content is None or isinstance(content, str) else json_type(content)
        if got is not None:
            raise record.error(f'message {index} "content" must be a string or a list of content parts (objects), got {got}')
        checked.append({key: value for key, value in message.items() if value is not None})
    if not any(message["role"] == "assistant" for message in checked):
        raise record.error('no message with role "assistant": nothing to train on')
    return checked


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
