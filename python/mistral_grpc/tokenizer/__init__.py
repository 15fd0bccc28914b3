"""Mistral-7B-Instruct tokenization: chat templates v1/v3, streaming detokenization, tool calls.

Modules: vocab (HF tokenizers, SentencePiece-exact encoding), messages (request types),
validation + template (the chat formats, as mistral-common), detokenizer, tool_calls,
mistral_tokenizer (the MistralTokenizer facade the server and engine use).
"""

from mistral_grpc.tokenizer.detokenizer import IncrementalDetokenizer
from mistral_grpc.tokenizer.messages import ChatMessage, TemplateError, ToolCall, ToolDefinition
from mistral_grpc.tokenizer.mistral_tokenizer import MistralTokenizer

__all__ = [
    "ChatMessage",
    "IncrementalDetokenizer",
    "MistralTokenizer",
    "TemplateError",
    "ToolCall",
    "ToolDefinition",
]
