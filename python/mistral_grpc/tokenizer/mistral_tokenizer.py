"""MistralTokenizer: prompts for Mistral-7B-Instruct, token for token as mistral-common builds them."""

from __future__ import annotations

import functools
from pathlib import Path

from mistral_grpc.tokenizer import template as chat_template
from mistral_grpc.tokenizer import tool_calls
from mistral_grpc.tokenizer.detokenizer import IncrementalDetokenizer, decode
from mistral_grpc.tokenizer.messages import ChatMessage, ToolCall, ToolDefinition
from mistral_grpc.tokenizer.vocab import Vocab

TEMPLATES = ("auto", "v1", "v3")


class MistralTokenizer:
    """Chat template, encoding and decoding for one Mistral 7B vocabulary.

    template_version "v1": Mistral-7B-Instruct v0.1 / v0.2 (32000 tokens, "[INST]" as text);
    "v3": v0.3 (32768 tokens, control tokens for [INST], tools, tool calls and results).
    """

    def __init__(self, vocab: Vocab, template_version: str = "auto") -> None:
        if template_version not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, not {template_version!r}")
        v3_ids = {name: vocab.token_id(spelling) for name, spelling in chat_template.V3_CONTROLS.items()}
        has_v3_controls = all(i in vocab.control_ids for i in v3_ids.values())
        if template_version == "auto":
            template_version = "v3" if has_v3_controls else "v1"
        if template_version == "v3" and not has_v3_controls:
            raise ValueError(
                "template v3 needs the [INST], [TOOL_CALLS], ... control tokens, which this vocabulary "
                "lacks (a Mistral-7B-Instruct v0.1/v0.2 tokenizer? use template v1)"
            )
        bos, eos = vocab.token_id("<s>"), vocab.token_id("</s>")
        if bos is None or eos is None:
            raise ValueError("the vocabulary has no <s> / </s> tokens: not a Mistral tokenizer")
        self._vocab = vocab
        self._version = template_version
        extra = v3_ids if template_version == "v3" else {}
        self._controls = chat_template.ControlTokens(bos=bos, eos=eos, **extra)

    @classmethod
    def from_file(cls, tokenizer_json_path: str | Path, template: str = "auto") -> "MistralTokenizer":
        return cls(Vocab.from_file(tokenizer_json_path), template)

    @classmethod
    def from_dir(cls, model_dir: str | Path, template: str = "auto") -> "MistralTokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a Hugging Face model directory has one)")
        return cls.from_file(path, template)

    @property
    def vocab_size(self) -> int:
        return self._vocab.size

    @property
    def bos_id(self) -> int:
        return self._controls.bos

    @property
    def eos_id(self) -> int:
        return self._controls.eos

    @property
    def template_version(self) -> str:
        return self._version

    @property
    def tool_calls_token_id(self) -> int | None:
        """The v3 token that opens a tool-call payload; None on v1 (no tool calls there)."""
        return self._controls.tool_calls

    def encode(self, text: str) -> list[int]:
        """Plain text, no BOS: control-token spellings in it stay text."""
        return self._vocab.encode([text])[0]

    def encode_chat(self, messages: list[ChatMessage], tools: list[ToolDefinition] | None = None) -> list[int]:
        """The whole prompt, BOS first, for the model to continue with the assistant's answer.

        Raises TemplateError (with .field) for what Mistral's format cannot express.
        """
        segments = chat_template.render(self._version, messages, tools, self._controls)
        texts = iter(self._vocab.encode([s for s in segments if isinstance(s, str)]))
        ids: list[int] = []
        for segment in segments:
            if isinstance(segment, str):
                ids += next(texts)
            else:
                ids.append(segment)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text as mistral-common decodes it: control tokens dropped, a leading space dropped."""
        return decode(self._vocab, ids)

    def detokenizer(self) -> IncrementalDetokenizer:
        """A streaming decode of generated ids: its pieces concatenate to `decode` of the same ids."""
        return IncrementalDetokenizer(self._vocab)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its bytes bound them): a text of c characters
        encodes to at least c / max_token_chars tokens."""
        return max(len(self._vocab.surface(i, at_start=False) or b"") for i in range(self.vocab_size))

    def token_bytes(self, token_id: int, at_start: bool = False) -> bytes:
        """The bytes a token adds to the text (for logprobs); control tokens give b"".

        at_start: no text came before it, so its leading space is dropped as `decode` drops it, and
        the logprob tokens of a reply concatenate to its content.
        """
        return self._vocab.surface(token_id, at_start) or b""

    def parse_tool_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, tool_calls) from a v3 tool-call payload; (text, []) when it is not one.

        Pass the decoded text of the ids generated after `tool_calls_token_id` (decode drops that
        token). Each call gets a fresh 9-character id; arguments come back as JSON text.
        """
        if self._version != "v3":
            return text, []
        return tool_calls.parse_tool_calls(text)
