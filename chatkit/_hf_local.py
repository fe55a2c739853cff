"""A local Hugging Face causal LM as a LangChain chat model (the ``local`` extra; imported on first use,
through ``optional_import``, by :func:`chatkit.load_local_chat_model`: it loads torch).

``ChatHuggingFace`` over a ``HuggingFacePipeline`` only works synchronously (its ``_agenerate`` raises and its
``_astream`` talks to a remote endpoint), so :class:`LocalChatHuggingFace` routes the async API through
LangChain's default: the synchronous call in a worker thread. Cancelling the awaiting task does not stop
a generation already running in that thread; it finishes and is discarded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline

from ._optional import optional_import

__all__ = ["LocalChatHuggingFace", "build_local_chat_model"]


class LocalChatHuggingFace(ChatHuggingFace):
    """``ChatHuggingFace`` over a local pipeline, with ``ainvoke``/``astream`` run in a worker thread."""

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await BaseChatModel._agenerate(self, messages, stop, run_manager, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in BaseChatModel._astream(self, messages, stop, run_manager, **kwargs):
            yield chunk


def build_local_chat_model(
    path: Path,
    *,
    max_new_tokens: int,
    do_sample: bool,
    chat_template: str,
    pipeline_kwargs: dict[str, Any],
) -> LocalChatHuggingFace:
    """Load tokenizer and model from ``path`` (local files only) and wrap them; see ``load_local_chat_model``."""
    transformers = optional_import("transformers", extra="local", feature="load_local_chat_model()")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load a causal language model from {str(path)!r}: {exc}") from exc
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "return_full_text": False}
    generation.update(pipeline_kwargs)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, **generation)
    llm = HuggingFacePipeline(pipeline=pipe, model_id=str(path))
    return LocalChatHuggingFace(llm=llm, tokenizer=tokenizer, model_id=str(path))
