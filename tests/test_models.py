"""ExtractiveChatModel (standard LangChain unit suite, answers, streaming, latency) and the local HF loader."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from chatkit import ExtractiveChatModel, SessionManager, load_local_chat_model
from chatkit.models import format_context, parse_context


class TestExtractiveChatModelStandard(ChatModelUnitTests):
    """LangChain's standard unit tests for chat models."""

    @property
    def chat_model_class(self) -> type[ExtractiveChatModel]:
        return ExtractiveChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"latency": 0.0}


DOCS = [
    Document("Shipping is free above 50 euros. Parcels leave within a day.", metadata={"source": "shipping.md"}),
    Document("Refunds are paid within 14 days. Keep the receipt.", metadata={"source": "refunds.md"}),
]


def ask(model: ExtractiveChatModel, question: str, docs: list[Document] | None = None) -> str:
    messages: list[Any] = [HumanMessage(question)]
    if docs:
        messages.insert(0, SystemMessage(format_context(docs)))
    return str(model.invoke(messages).content)


def test_answers_from_the_best_matching_chunk_and_names_its_source() -> None:
    model = ExtractiveChatModel()
    assert ask(model, "How long until refunds are paid?", DOCS) == "According to refunds.md: Refunds are paid within 14 days."
    assert ask(model, "Is shipping free?", DOCS) == "According to shipping.md: Shipping is free above 50 euros."


def test_ties_go_to_the_better_ranked_chunk() -> None:
    assert ask(ExtractiveChatModel(), "Tell me everything", DOCS).startswith("According to shipping.md:")


MARKDOWN = Document(
    "# Double Texting in Chat Apps\n\n"
    '"Double texting" is the name for a user sending a second message before the first was answered. '
    "People do it all the time.\n\n## What goes wrong\n\n"
    "- **Lost turns**: both runs load the same history; one exchange vanishes.\n"
    "```python\nawait chat(double, texting)\n```\n"
    "| double | texting |\n|---|---|\n"
    "Then the second run of the double texting story is cut",
    metadata={"source": "double-texting.md"},
)


def test_never_answers_with_a_heading_or_a_markdown_fragment() -> None:
    """The demo's reply to "What is double texting?" was the heading "# Double Texting in Chat Apps"."""
    reply = ask(ExtractiveChatModel(), "What is double texting?", [MARKDOWN])
    assert reply.startswith('According to double-texting.md: "Double texting" is the name for a user sending')
    for fragment in ("#", "**", "```", "|", "- ", "is cut"):
        assert fragment not in reply


def test_sentences_cut_at_a_chunks_edges_are_not_quoted() -> None:
    chunk = Document("the first one started in the previous chunk. Locks serialize the turns of a session. And the", metadata={"source": "locks.md"})
    assert ask(ExtractiveChatModel(), "What do locks serialize?", [chunk]) == (
        "According to locks.md: Locks serialize the turns of a session."
    )


def test_a_second_matching_sentence_names_its_own_source() -> None:
    docs = [
        Document("Refunds are paid within 14 days. Keep the receipt.", metadata={"source": "refunds.md"}),
        Document("Refunds of sale items are paid as vouchers.", metadata={"source": "sales.md"}),
    ]
    assert ask(ExtractiveChatModel(), "How are refunds paid?", docs) == (
        "According to refunds.md: Refunds are paid within 14 days. See also sales.md: Refunds of sale items are "
        "paid as vouchers."
    )


def test_without_a_complete_sentence_it_says_so() -> None:
    docs = [Document("# Only a heading\n\n```\ncode()\n```", metadata={"source": "code.md"})]
    assert ask(ExtractiveChatModel(), "code?", docs) == (
        "The best match is code.md, but it holds no complete sentence to quote."
    )


def test_without_context_it_quotes_the_message_and_counts_the_turns() -> None:
    model = ExtractiveChatModel()
    history = [HumanMessage("hi"), AIMessage("hello"), HumanMessage("And now?")]
    assert model.invoke(history).content == 'Message 2: you said "And now?". I found no documents to answer from.'


def test_is_deterministic_and_streams_the_same_text() -> None:
    model = ExtractiveChatModel()
    messages = [SystemMessage(format_context(DOCS)), HumanMessage("refunds?")]
    chunks = [c.content for c in model.stream(messages)]
    assert len(chunks) > 3
    assert "".join(chunks) == model.invoke(messages).content == model.invoke(messages).content


async def test_async_stream_and_invoke_agree() -> None:
    model = ExtractiveChatModel()
    messages = [HumanMessage("async?")]
    chunks = [c.content async for c in model.astream(messages)]
    assert "".join(chunks) == (await model.ainvoke(messages)).content


def test_context_round_trips_through_the_system_message() -> None:
    docs = [Document('a <tag> & "quotes"', metadata={"source": 'we"ird <src>'}), Document("no source", id="doc-7")]
    assert parse_context(format_context(docs)) == [('we"ird <src>', 'a <tag> & "quotes"'), ("doc-7", "no source")]


def test_max_tokens_and_stop_shorten_the_reply() -> None:
    assert ask(ExtractiveChatModel(max_tokens=3), "hello there") == "Message 1: you"
    assert ask(ExtractiveChatModel(stop=["you"]), "hello there") == "Message 1: "


async def test_latency_callable_gets_the_user_text_and_may_return_an_awaitable() -> None:
    seen: list[str] = []
    release = asyncio.Event()

    def latency(text: str) -> Any:
        seen.append(text)
        return release.wait()

    model = ExtractiveChatModel(latency=latency)
    task = asyncio.create_task(model.ainvoke([HumanMessage("wait for me")]))
    while not seen:
        await asyncio.sleep(0)
    assert not task.done()
    release.set()
    assert "wait for me" in (await task).content
    assert seen == ["wait for me"]


async def test_numeric_latency_is_awaited_with_asyncio_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(seconds: float, result: Any = None) -> Any:
        if seconds > 0:
            slept.append(seconds)
            return result
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    model = ExtractiveChatModel(latency=2.0)
    await model.ainvoke([HumanMessage("slow")])
    [c async for c in model.astream([HumanMessage("slow")])]
    assert slept == [2.0, 2.0]


def test_sync_api_refuses_an_awaitable_latency() -> None:
    model = ExtractiveChatModel(latency=lambda text: asyncio.sleep(0))
    with pytest.raises(TypeError, match="only the async API"):
        model.invoke([HumanMessage("sync")])


@pytest.mark.parametrize(
    ("latency", "error"), [(-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("1s", TypeError)]
)
def test_bad_latency_is_refused(latency: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="latency"):
        ExtractiveChatModel(latency=latency)


def test_a_latency_callable_returning_nonsense_is_refused() -> None:
    with pytest.raises(ValueError, match="latency callable must return"):
        ExtractiveChatModel(latency=lambda text: -5).invoke([HumanMessage("x")])


def test_unknown_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="latncy"):
        ExtractiveChatModel(latncy=1)  # type: ignore[call-arg]


def test_repr() -> None:
    assert repr(ExtractiveChatModel(latency=0.05)) == "<ExtractiveChatModel latency=0.05s model_name='extractive'>"
    assert "latency=callable" in repr(ExtractiveChatModel(latency=lambda t: 0))


# ---------------------------------------------------------------- load_local_chat_model


def test_loader_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no local model directory"):
        load_local_chat_model(tmp_path / "nope")


def test_loader_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_local_chat_model(tmp_path / "model.bin")


def test_loader_refuses_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_local_chat_model(tmp_path)


@pytest.mark.model  # imports torch and transformers
def test_loader_refuses_a_broken_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ValueError, match="could not load a causal language model"):
        load_local_chat_model(tmp_path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with random weights and a BPE tokenizer trained here on a few sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = [
        "How long do refunds take? Refunds are paid within 14 days.",
        "Is shipping free? Shipping is free above 50 euros.",
        "Hello! How can I help you today?",
    ] * 4
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(text, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.model
async def test_a_tiny_local_model_chats_through_the_session_manager(tiny_model_dir: Path) -> None:
    model = load_local_chat_model(tiny_model_dir, max_new_tokens=6)
    manager = SessionManager(model=model)
    sid = await manager.create_session()
    first = await manager.chat(sid, "How long do refunds take?")
    again = await manager.chat(sid, "Is shipping free?")
    assert isinstance(first.reply, str) and isinstance(again.reply, str)
    history = await manager.get_history(sid)
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    assert [history[1].content, history[3].content] == [first.reply, again.reply]
    streamed = "".join([c async for c in manager.stream(sid, "Hello!")])
    assert (await manager.get_history(sid))[-1].content == streamed


@pytest.mark.model
def test_a_tiny_local_model_is_deterministic_with_greedy_decoding(tiny_model_dir: Path) -> None:
    model = load_local_chat_model(tiny_model_dir, max_new_tokens=6)
    messages = [HumanMessage("Hello!")]
    assert model.invoke(messages).content == model.invoke(messages).content
