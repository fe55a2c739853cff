"""Chat models: an offline, deterministic extractive model, and a loader for local Hugging Face models.

How retrieved context reaches a model (the *context protocol*): the ``generate`` node of
:class:`~chatkit.SessionManager` puts one :class:`~langchain_core.messages.SystemMessage` in front of the
conversation, built by :func:`format_context`. Its text is an instruction followed by one block per
retrieved chunk, best match first::

    <context source="handbook.md">
    Refunds are paid within 14 days.
    </context>

Any LLM can read that; :class:`ExtractiveChatModel` parses it back with :func:`parse_context`. The system
message is built for each model call and never stored in the session's history.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import math
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, SecretStr, field_validator

from ._optional import optional_import

if TYPE_CHECKING:
    from langchain_huggingface import ChatHuggingFace

__all__ = [
    "ExtractiveChatModel",
    "load_local_chat_model",
    "format_context",
    "parse_context",
    "CONTEXT_INSTRUCTION",
]

CONTEXT_INSTRUCTION = (
    "Answer the user's last message using only the context below, and name the source you used."
)

_BLOCK = re.compile(r'<context source="(?P<source>[^"]*)">\n(?P<text>.*?)\n</context>', re.DOTALL)
_WORD = re.compile(r"[a-z0-9]+")
_CHUNK = re.compile(r"\S+\s*")
# a sentence ends at . ! or ? (maybe followed by a closing quote or bracket) before whitespace, except after
# a few abbreviations
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<!\bvs\.)(?<=[.!?])[\"')\]\u201d\u2019]?\s+")
# ...and a whole one starts with a capital, a digit, a quote, a bracket or inline code
_WHOLE = re.compile(r"^[\"'(\[\u201c\u2018]?[A-Z0-9`].*[.!?][\"')\]\u201d\u2019]?$", re.DOTALL)
_HEADING = re.compile(r"^\s{0,3}(#{1,6}\s|={3,}\s*$|-{3,}\s*$|\*{3,}\s*$|\|)")
_LIST_MARK = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_EMPHASIS = re.compile(r"(\*\*|__|\*(?=\S)|(?<=\S)\*)")
_MIN_WORDS = 3  # "Keep the receipt." is a sentence; "Overview." is not
# small words that say nothing about which chunk answers a question
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from has have how i if in is it its me my of on or "
    "our so that the their there these this to was we were what when where which who why will with "
    "you your".split()
)


def _source_of(doc: Document, rank: int) -> str:
    source = doc.metadata.get("source") if doc.metadata else None
    if source is None:
        source = doc.id if doc.id is not None else f"document {rank}"
    return str(source)


def format_context(documents: Sequence[Document], *, instruction: str = CONTEXT_INSTRUCTION) -> str:
    """Render retrieved chunks as the text of the context system message (best match first).

    Each chunk's source is its ``metadata["source"]``, else its id, else ``"document N"``.

    Example:
        >>> from langchain_core.documents import Document
        >>> print(format_context([Document("Refunds take 14 days.", metadata={"source": "faq.md"})]))
        Answer the user's last message using only the context below, and name the source you used.
        <BLANKLINE>
        <context source="faq.md">
        Refunds take 14 days.
        </context>
    """
    blocks = [
        f'<context source="{html.escape(_source_of(d, i), quote=True)}">\n'
        f"{html.escape(d.page_content, quote=False)}\n</context>"
        for i, d in enumerate(documents, 1)
    ]
    return "\n\n".join([instruction, *blocks])


def parse_context(text: str) -> list[tuple[str, str]]:
    """The ``(source, text)`` chunks in a context message made by :func:`format_context`, in order.

    Example:
        >>> from langchain_core.documents import Document
        >>> parse_context(format_context([Document("a < b", metadata={"source": 'x "1"'})]))
        [('x "1"', 'a < b')]
    """
    return [(html.unescape(m["source"]), html.unescape(m["text"])) for m in _BLOCK.finditer(text)]


def _stem(word: str) -> str:
    """A crude singular: "updates" and "update" match (enough for picking sentences, not linguistics)."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _words(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def _plain(line: str) -> str:
    """A markdown line as plain text, except inline code: no list marker, emphasis or link targets."""
    line = _LIST_MARK.sub("", line)
    line = _LINK.sub(r"\1", line)
    return _EMPHASIS.sub("", line).strip()


def whole_sentences(text: str) -> list[str]:
    """The complete sentences of a (markdown) chunk, in order, as plain text.

    Headings, rules, table rows and code blocks are left out; list items count as sentences when they are
    ones. A chunk cut out of a longer text may start or end in the middle of a sentence: such fragments
    are left out too (a sentence starts with a capital, a digit or a quote, ends with ``.``, ``!`` or ``?``
    and has at least three words).

    Example:
        >>> whole_sentences("# Refunds\\n\\nRefunds are paid within **14 days**. Keep the receipt. And the")
        ['Refunds are paid within 14 days.', 'Keep the receipt.']
        >>> whole_sentences("ends mid-way. Then a whole one follows here.")
        ['Then a whole one follows here.']
    """
    paragraphs: list[str] = []
    current: list[str] = []
    in_code = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_code = not in_code
            continue
        if in_code or _HEADING.match(line) or not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if _LIST_MARK.match(line) and current:  # each list item is a paragraph of its own
            paragraphs.append(" ".join(current))
            current = []
        current.append(_plain(line))
    if current:
        paragraphs.append(" ".join(current))
    sentences: list[str] = []
    for paragraph in paragraphs:
        for piece in _SENTENCE_END.split(" ".join(paragraph.split())):
            piece = piece.strip()
            if _WHOLE.match(piece) and len(piece.split()) >= _MIN_WORDS:
                sentences.append(piece.replace("`", ""))
    return sentences


def last_user_text(messages: Sequence[BaseMessage]) -> str:
    """The text of the last human message (``""`` when there is none)."""
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return m.text
    return ""


def _chunks_in(messages: Sequence[BaseMessage]) -> list[tuple[str, str]]:
    chunks: list[tuple[str, str]] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            chunks.extend(parse_context(m.text))
    return chunks


def _extract(asked: set[str], chunks: Sequence[tuple[str, str]]) -> str:
    """The extractive reply: whole sentences of the chunks that share the most words with the question.

    The best chunk is the one sharing the most words with the question (ties: the better-ranked chunk)
    among those holding a complete sentence; its best sentence (most shared words; ties: the earlier one)
    comes first. At most one more sentence follows, from any chunk, if it shares at least two words and
    at least half as many as the first. Each source is named before its sentence; with no complete
    sentence in any chunk, the reply says so.
    """
    parsed = [(rank, source, text, whole_sentences(text)) for rank, (source, text) in enumerate(chunks)]
    usable = [c for c in parsed if c[3]]
    if not usable:
        return f"The best match is {chunks[0][0]}, but it holds no complete sentence to quote."
    rank, source, text, sentences = max(usable, key=lambda c: (len(asked & _words(c[2])), -c[0]))
    first = max(range(len(sentences)), key=lambda i: (len(asked & _words(sentences[i])), -i))
    shared = len(asked & _words(sentences[first]))
    picked = [(rank, first, source, sentences[first])]
    seen = {" ".join(sentences[first].lower().split())}
    runner_up: tuple[int, int, int, str, str] | None = None  # (-shared, rank, position, source, sentence)
    for other_rank, other_source, _, other_sentences in usable:
        for position, sentence in enumerate(other_sentences):
            key = " ".join(sentence.lower().split())
            if key in seen:  # overlapping chunks repeat sentences
                continue
            n = len(asked & _words(sentence))
            if n >= max(2, (shared + 1) // 2):
                candidate = (-n, other_rank, position, other_source, sentence)
                runner_up = candidate if runner_up is None else min(runner_up, candidate)
    if runner_up is not None:
        picked.append((runner_up[1], runner_up[2], runner_up[3], runner_up[4]))
    # the first sentence's source first; the sentences of one source in reading order
    picked[1:] = sorted(picked[1:])
    if len(picked) == 2 and picked[1][2] == picked[0][2] and picked[1][:2] < picked[0][:2]:
        picked.reverse()
    parts: list[str] = []
    named: str | None = None
    for _, _, name, sentence in picked:
        if name != named:
            parts.append(f"According to {name}:" if named is None else f"See also {name}:")
            named = name
        parts.append(sentence)
    return " ".join(parts)


def _check_latency(value: Any) -> Any:
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"latency must be seconds (a number) or a callable(user_text) -> seconds, got {value!r}")
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"latency must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _seconds(value: object, *, awaited: bool = False) -> float:
    if value is None or (awaited and isinstance(value, bool)):  # e.g. the True of asyncio.Event.wait()
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"the latency callable must return seconds >= 0 or None, got {value!r}")
    return float(value)


class ExtractiveChatModel(BaseChatModel):
    """An offline, deterministic chat model that answers from retrieved context, with streaming.

    * With context (a system message made by :func:`format_context`), it picks the chunk sharing the most
      words with the user's last message (ties: the better-ranked chunk), answers with that chunk's
      best-matching complete sentence, plus at most one more (from any chunk) that shares at least two
      words and half as many, and names the source of each:
      ``According to faq.md: Refunds take 14 days.`` Markdown headings, code, table rows and the
      fragments of sentences cut at a chunk's edges are never quoted (:func:`whole_sentences`).
    * Without context it quotes the user's message and says which user message of the conversation it is,
      so a reply shows whether the model saw the earlier turns: ``Message 2: you said "hi". ...``

    ``latency`` is seconds to wait before answering, or a callable taking the user's message text and
    returning seconds (or ``None``), or an awaitable of them (``None`` or a bool count as 0): tests return
    an ``asyncio.Event().wait()`` to decide exactly when each reply may finish. The async API waits with ``asyncio.sleep`` (other tasks
    keep running); the sync API with ``time.sleep`` and refuses awaitables.

    The usual chat model parameters (``temperature``, ``timeout``, ``max_retries``, ``api_key``) are
    accepted and ignored; ``max_tokens`` cuts the reply to that many words and ``stop`` at the first stop
    string. Unknown parameters raise, so a typo such as ``latncy=`` does not pass silently.

    Example:
        >>> from langchain_core.messages import HumanMessage, SystemMessage
        >>> from langchain_core.documents import Document
        >>> model = ExtractiveChatModel()
        >>> model.invoke([HumanMessage("How long do refunds take?")]).content
        'Message 1: you said "How long do refunds take?". I found no documents to answer from.'
        >>> ctx = format_context([Document("Shipping is free. Refunds take 14 days.", metadata={"source": "faq.md"})])
        >>> model.invoke([SystemMessage(ctx), HumanMessage("How long do refunds take?")]).content
        'According to faq.md: Refunds take 14 days.'
        >>> [c.content for c in model.stream([HumanMessage("hi")])][:3]
        ['Message ', '1: ', 'you ']

    Raises:
        TypeError: ``latency`` is neither a number nor a callable.
        ValueError: a negative, NaN or infinite ``latency`` (or a callable returning one).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    latency: Any = Field(default=0.0)
    """Seconds before the reply, or ``callable(user_text) -> seconds | None | awaitable``."""
    model_name: str = Field(default="extractive", alias="model")
    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    max_retries: int | None = None
    api_key: SecretStr | None = None
    streaming: bool = False

    @field_validator("latency")
    @classmethod
    def _validate_latency(cls, value: Any) -> Any:
        return _check_latency(value)

    @property
    def _llm_type(self) -> str:
        return "chatkit-extractive"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="chatkit",
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name,
            ls_model_type="chat",
        )
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def __repr__(self) -> str:
        latency = "callable" if callable(self.latency) else f"{self.latency:g}s"
        return f"<ExtractiveChatModel latency={latency} model_name={self.model_name!r}>"

    # ------------------------------------------------------------------ the answer

    def answer(self, messages: Sequence[BaseMessage], stop: list[str] | None = None) -> str:
        """The reply to ``messages`` (no latency): see the class docstring for the rules."""
        question = last_user_text(messages)
        chunks = _chunks_in(messages)
        if chunks:
            reply = _extract(_words(question), chunks)
        else:
            turn = sum(isinstance(m, HumanMessage) for m in messages)
            reply = f'Message {turn}: you said "{question}". I found no documents to answer from.'
        for s in stop or self.stop or ():
            if s and s in reply:
                reply = reply[: reply.index(s)]
        if self.max_tokens is not None:
            reply = "".join(_CHUNK.findall(reply)[: max(self.max_tokens, 0)]).rstrip()
        return reply

    def _usage(self, messages: Sequence[BaseMessage], reply: str) -> UsageMetadata:
        n_in = sum(len(m.text.split()) for m in messages)
        n_out = len(reply.split())
        return UsageMetadata(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)

    def _latency_sync(self, messages: Sequence[BaseMessage]) -> None:
        value = self.latency(last_user_text(messages)) if callable(self.latency) else self.latency
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
            raise TypeError(
                "the latency callable returned an awaitable, which only the async API (ainvoke, astream) can wait for"
            )
        seconds = _seconds(value)
        if seconds > 0:
            time.sleep(seconds)

    async def _latency_async(self, messages: Sequence[BaseMessage]) -> None:
        value = self.latency(last_user_text(messages)) if callable(self.latency) else self.latency
        awaited = inspect.isawaitable(value)
        if awaited:
            value = await value
        seconds = _seconds(value, awaited=awaited)
        if seconds > 0:
            await asyncio.sleep(seconds)

    def _result(self, messages: Sequence[BaseMessage], stop: list[str] | None) -> ChatResult:
        reply = self.answer(messages, stop)
        message = AIMessage(
            content=reply,
            usage_metadata=self._usage(messages, reply),
            response_metadata={"model_name": self.model_name, "finish_reason": "stop"},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    # ------------------------------------------------------------------ LangChain hooks

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._latency_sync(messages)
        return self._result(messages, stop)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await self._latency_async(messages)
        return self._result(messages, stop)

    def _chunks(self, messages: Sequence[BaseMessage], stop: list[str] | None) -> Iterator[ChatGenerationChunk]:
        reply = self.answer(messages, stop)
        pieces = _CHUNK.findall(reply) or [""]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=piece,
                    usage_metadata=self._usage(messages, reply) if last else None,
                    response_metadata={"model_name": self.model_name, "finish_reason": "stop"} if last else {},
                    chunk_position="last" if last else None,
                )
            )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        self._latency_sync(messages)
        for chunk in self._chunks(messages, stop):
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        await self._latency_async(messages)
        for i, chunk in enumerate(self._chunks(messages, stop)):
            if i:
                await asyncio.sleep(0)  # let other tasks run between chunks, as a real stream would
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


_DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def load_local_chat_model(
    directory: str | Path,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    chat_template: str | None = None,
    **pipeline_kwargs: Any,
) -> ChatHuggingFace:
    """Load a Hugging Face causal LM from a local directory as a LangChain chat model. Never downloads.

    The directory must hold what ``save_pretrained`` writes (``config.json``, the weights, the tokenizer).
    It is wrapped as ``ChatHuggingFace(llm=HuggingFacePipeline(...))``, with async calls (``ainvoke``,
    ``astream``) run in a worker thread, since the pipeline itself is synchronous. A tokenizer without a
    chat template gets ``chat_template`` or a plain ``role: content`` one. Importing torch and transformers
    happens here, on first use.

    Args:
        directory: the local model directory.
        max_new_tokens: the most tokens to generate per reply.
        do_sample: sample (``True``) or decode greedily (``False``, deterministic).
        chat_template: a Jinja chat template to use when the tokenizer has none.
        **pipeline_kwargs: more keyword arguments for ``transformers.pipeline("text-generation", ...)``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        NotADirectoryError: it is a file.
        ValueError: it is not a loadable model directory (no ``config.json``, or transformers refused it).
        ModuleNotFoundError: the ``local`` extra is missing (``pip install "chatkit[local]"``).

    Example (skipped here: it needs a model directory)::

        model = load_local_chat_model("models/tiny-gpt2", max_new_tokens=32)
        chatkit.SessionManager(model=model)
    """
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no local model directory at {str(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; give the directory that save_pretrained() wrote")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} is not a Hugging Face model directory: it has no config.json "
            "(save a model there with model.save_pretrained() and tokenizer.save_pretrained())"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    hf_local = optional_import("chatkit._hf_local", extra="local", feature="load_local_chat_model()")
    return hf_local.build_local_chat_model(  # type: ignore[no-any-return]
        path,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        chat_template=chat_template or _DEFAULT_CHAT_TEMPLATE,
        pipeline_kwargs=pipeline_kwargs,
    )
