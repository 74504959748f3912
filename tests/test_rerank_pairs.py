"""A reranker's query/document pair is laid out as the model's own Hugging Face tokenizer lays it out:
BERT's and XLM-RoBERTa's pair encodings, and a GGUF's rerank template (Qwen3-Reranker's) rendered
and tokenized as one text. The references are transformers' tokenizers built over the same
vocabularies, read back from the GGUFs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gguf import GGUFReader, TokenType
from transformers import AddedToken, BertTokenizer, Qwen2Tokenizer, XLMRobertaTokenizer

from daemon.options import LlamaParams
from daemon.runner.engine import Vocabulary, load_vocabulary
from tests.tiny_models import XLM_ROBERTA_PIECES, make_tiny_causal_gguf, make_xlm_roberta_vocab_gguf, tiny_vocab

PAIRS = [
    ("why is the sky blue?", "the sky is blue"),
    ("hello", "grass is green, word world!"),
    ("why   word", "a b c"),
]
# What llama.cpp's converter writes for Qwen3-Reranker (tokenizer.chat_template.rerank).
QWEN3_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct"
    ' provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n<Instruct>: Given a'
    " web search query, retrieve relevant passages that answer the query\n<Query>: {query}\n<Document>:"
    " {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
QWEN_ADDED = [
    ("<|im_start|>", TokenType.CONTROL),
    ("<|im_end|>", TokenType.CONTROL),
    ("<think>", TokenType.USER_DEFINED),  # Qwen3's thinking tags: added, not special
    ("</think>", TokenType.USER_DEFINED),
]
PARAMS = LlamaParams(
    n_gpu_layers=0, main_gpu=0, use_mmap=True, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1,
    n_threads_batch=1, limit_tokens=64, batch_tokens=64,
)  # fmt: skip


@contextmanager
def vocabulary_of(path: Path) -> Iterator[Vocabulary]:
    """The model's tokenizer alone, as the daemon loads it for /api/tokenize."""
    vocabulary, _facts, model = load_vocabulary(str(path), PARAMS)
    try:
        yield vocabulary
    finally:
        model.close()


@pytest.fixture
def bert(tiny_gguf: Path) -> Iterator[Vocabulary]:
    with vocabulary_of(tiny_gguf) as vocabulary:
        yield vocabulary


@pytest.fixture
def xlm_roberta(tmp_path: Path, tiny_gguf: Path) -> Iterator[Vocabulary]:
    with vocabulary_of(make_xlm_roberta_vocab_gguf(tiny_gguf, tmp_path / "xlm-roberta.gguf")) as vocabulary:
        yield vocabulary


@pytest.fixture
def qwen3_reranker_gguf(tmp_path: Path) -> Path:
    return make_tiny_causal_gguf(
        tmp_path / "qwen3-reranker.gguf", added_tokens=QWEN_ADDED, rerank_template=QWEN3_RERANK_TEMPLATE
    )


@pytest.mark.parametrize(("query", "document"), PAIRS)
def test_a_bert_pair_is_berts_pair_encoding(bert: Vocabulary, query: str, document: str) -> None:
    reference = BertTokenizer(vocab={token: index for index, token in enumerate(tiny_vocab())})
    tokens, after_document = bert.pair_tokens(query, document)
    assert tokens == reference(query, document)["input_ids"]  # [CLS] q [SEP] d [SEP]
    assert after_document == 1


@pytest.mark.parametrize(("query", "document"), PAIRS)
def test_an_xlm_roberta_pair_is_xlm_robertas_pair_encoding(xlm_roberta: Vocabulary, query: str, document: str) -> None:
    reference = XLMRobertaTokenizer(vocab=XLM_ROBERTA_PIECES)
    tokens, after_document = xlm_roberta.pair_tokens(query, document)
    expected = reference(query, document)["input_ids"]
    assert tokens == expected  # <s> q </s></s> d </s>
    assert expected.count(2) == 3 and after_document == 1


def qwen_reference(path: Path) -> Qwen2Tokenizer:
    """Qwen's tokenizer (byte-level BPE with Qwen2's pre-tokenizer) over the GGUF's tokens and merges,
    with its added tokens as Qwen3's tokenizer has them."""
    reader = GGUFReader(path)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    merges = [tuple(merge.split(" ")) for merge in reader.fields["tokenizer.ggml.merges"].contents()]
    reference = Qwen2Tokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges)
    reference.add_tokens(
        [AddedToken(text, special=kind == TokenType.CONTROL, normalized=False) for text, kind in QWEN_ADDED]
    )
    assert [reference.convert_tokens_to_ids(text) for text, _ in QWEN_ADDED] == [tokens.index(t) for t, _ in QWEN_ADDED]
    return reference


@pytest.mark.parametrize(("query", "document"), [*PAIRS, ("word word", "word\n\nword ")])
def test_a_templated_pair_is_the_template_rendered_and_tokenized_as_one_text(
    qwen3_reranker_gguf: Path, query: str, document: str
) -> None:
    reference = qwen_reference(qwen3_reranker_gguf)
    rendered = QWEN3_RERANK_TEMPLATE.replace("{query}", query).replace("{document}", document)
    expected = reference(rendered, add_special_tokens=False)["input_ids"]
    with vocabulary_of(qwen3_reranker_gguf) as vocabulary:
        tokens, after_document = vocabulary.pair_tokens(query, document)
    assert tokens == expected
    # What follows the document (kept when a long pair is cut) is the template's tail, whole.
    tail = reference("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False)
    assert after_document == len(tail["input_ids"]) and tokens[-after_document:] == tail["input_ids"]


def test_a_document_that_spells_a_control_token_stays_text(qwen3_reranker_gguf: Path) -> None:
    im_end = len(GGUFReader(qwen3_reranker_gguf).fields["tokenizer.ggml.tokens"].contents()) - 3
    with vocabulary_of(qwen3_reranker_gguf) as vocabulary:
        plain, _ = vocabulary.pair_tokens("q", "d")
        spelled, _ = vocabulary.pair_tokens("q", "d<|im_end|>")
    assert plain.count(im_end) == spelled.count(im_end) == 2  # the template's own two
    assert len(spelled) > len(plain) + 5
