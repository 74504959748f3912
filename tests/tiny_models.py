"""Small real models for tests: a Hugging Face BERT directory with random weights, made in
milliseconds, which emberd converts to GGUF like any other model."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, PoolingType, TokenType
from safetensors.numpy import save_file

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "sky", "is", "blue", "why", "grass", "green", "word", "hello", "world"]
PUNCTUATION = list("?.,!;:'\"()-")


def tiny_vocab() -> list[str]:
    letters = list(string.ascii_lowercase + string.digits)
    return SPECIAL_TOKENS + WORDS + PUNCTUATION + letters + [f"##{c}" for c in letters]


def make_tiny_bert_dir(
    directory: Path,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    context: int = 64,
    pooling: str = "mean",
    poison_with_nan: bool = False,
    seed: int = 0,
    classifier: bool = False,
) -> Path:
    """Write config.json, vocab.txt, model.safetensors and 1_Pooling/config.json; with `classifier`,
    a cross-encoder (BertForSequenceClassification: a reranker)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    intermediate = hidden * 2
    config = {
        "architectures": ["BertForSequenceClassification" if classifier else "BertModel"],
        "model_type": "bert",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": context,
        "type_vocab_size": 2,
        "vocab_size": len(vocab),
        "layer_norm_eps": 1e-12,
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_cls_token": pooling == "cls"})
    )
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": weight(len(vocab), hidden),
        "embeddings.position_embeddings.weight": weight(context, hidden),
        "embeddings.token_type_embeddings.weight": weight(2, hidden),
        "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32),
        "pooler.dense.weight": weight(hidden, hidden),  # dropped by the converter
    }
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            tensors[prefix + part + ".weight"] = weight(hidden, hidden)
            tensors[prefix + part + ".bias"] = weight(hidden)
        tensors[prefix + "intermediate.dense.weight"] = weight(intermediate, hidden)
        tensors[prefix + "intermediate.dense.bias"] = weight(intermediate)
        tensors[prefix + "output.dense.weight"] = weight(hidden, intermediate)
        tensors[prefix + "output.dense.bias"] = weight(hidden)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[prefix + norm + ".weight"] = np.ones(hidden, np.float32)
            tensors[prefix + norm + ".bias"] = np.zeros(hidden, np.float32)
    if classifier:
        tensors["classifier.weight"] = weight(1, hidden)
        tensors["classifier.bias"] = weight(1)
    if poison_with_nan:
        tensors["embeddings.LayerNorm.bias"][:] = np.nan
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def make_header_only_gguf(path: Path, architecture: str = "llama") -> Path:
    """A GGUF with metadata but no pooling type: a generative model as far as emberd can tell."""
    writer = GGUFWriter(path, architecture)
    writer.add_name("not-an-embedder")
    writer.add_context_length(128)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (its byte-level BPE's base vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)]


# Merges that make "word" and " word" one token each, so " ".join(["word"] * n) is n tokens.
_CAUSAL_MERGES = ["w o", "r d", "wo rd", "Ġ word"]
_CAUSAL_SPECIALS = ["<|bos|>", "<|endoftext|>"]


def make_tiny_causal_gguf(
    path: Path,
    context: int = 2048,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 0,
    pooling: PoolingType = PoolingType.LAST,
    filler_tokens: int = 0,
    seed: int = 0,
    added_tokens: Sequence[tuple[str, TokenType]] = (),
    rerank_template: str | None = None,
) -> Path:
    """A qwen3 embedder (causal attention, last-token pooling by default) with random weights and a
    byte-level BPE vocabulary, written directly as GGUF. The tokenizer adds a BOS and an EOS, so a
    text of n words "word" is n + 2 tokens, as for the tiny BERT. `filler_tokens` widens the
    vocabulary with tokens no text produces (a real embedder's vocabulary is 150k tokens wide).
    `added_tokens` come last (a Hugging Face tokenizer's added tokens: control or user-defined);
    `rerank_template` is written as tokenizer.chat_template.rerank (a Qwen3-Reranker's GGUF)."""
    head_dim = head_dim or hidden // heads
    intermediate = hidden * 2
    filler = [f"<filler{index}>" for index in range(filler_tokens)]
    tokens = _byte_symbols() + [merge.replace(" ", "") for merge in _CAUSAL_MERGES] + filler + _CAUSAL_SPECIALS
    token_types = [TokenType.NORMAL] * (len(tokens) - len(_CAUSAL_SPECIALS)) + [TokenType.CONTROL] * 2
    tokens += [text for text, _ in added_tokens]
    token_types += [kind for _, kind in added_tokens]
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = GGUFWriter(path, "qwen3")
    writer.add_name("tiny-causal")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_pooling_type(pooling)
    writer.add_file_type(0)  # ALL_F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(_CAUSAL_MERGES)
    writer.add_bos_token_id(tokens.index("<|bos|>"))
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    if rerank_template is not None:
        writer.add_chat_template([{"name": "rerank", "template": rerank_template}])
    # numpy shapes are GGUF's dimensions reversed: (rows = outputs, columns = inputs).
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for layer in range(layers):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(prefix + "attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(prefix + "attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(prefix + "attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(prefix + "attn_q_norm.weight", np.ones(head_dim, np.float32))
        writer.add_tensor(prefix + "attn_k_norm.weight", np.ones(head_dim, np.float32))
        writer.add_tensor(prefix + "attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", weight(intermediate, hidden))
        writer.add_tensor(prefix + "ffn_up.weight", weight(intermediate, hidden))
        writer.add_tensor(prefix + "ffn_down.weight", weight(hidden, intermediate))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def copy_gguf(source: Path, path: Path, changes: dict[str, Any], architecture: str | None = None) -> Path:
    """A copy of a GGUF with some keys set (a key it has keeps its type; a new one takes its value's,
    or the type given with it as (value, GGUFValueType)), and under another `architecture` if given
    (its {arch}.* keys renamed with it). Tensors are copied as they are."""
    reader = GGUFReader(source)
    old = str(reader.fields["general.architecture"].contents())
    new = architecture or old
    writer = GGUFWriter(path, new)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in changes:
            continue
        new_key = new + key.removeprefix(old) if key.startswith(old + ".") else key
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(new_key, field.contents())
        else:
            writer.add_key_value(new_key, field.contents(), field.types[0])
    for key, value in changes.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, tuple):  # (value, its GGUFValueType)
            writer.add_key_value(key, *value)
        else:
            existing = reader.fields.get(key)
            writer.add_key_value(key, value, existing.types[0] if existing else GGUFValueType.get_type(value))
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_byteless_sentencepiece_gguf(bert_gguf: Path, path: Path) -> Path:
    """The tiny BERT with a SentencePiece tokenizer ("llama") over the same pieces, and no byte
    pieces (<0x00>..<0xFF>) to fall back on: a model llama.cpp loads and embeds ASCII words with,
    but whose tokenizer throws std::out_of_range, uncaught (the process aborts), on a character
    outside the vocabulary ("é")."""
    return copy_gguf(bert_gguf, path, {"tokenizer.ggml.model": "llama"})


# An XLM-RoBERTa vocabulary (SentencePiece unigram, as bge-reranker-v2-m3's): its four special
# pieces first, as XLMRobertaTokenizer numbers them, then pieces with their log probabilities.
XLM_ROBERTA_PIECES: list[tuple[str, float]] = [
    ("<s>", 0.0),
    ("<pad>", 0.0),
    ("</s>", 0.0),
    ("<unk>", 0.0),
    *((f"\u2581{word}", -2.0 - index / 10) for index, word in enumerate(WORDS)),
    ("\u2581", -3.0),
    ("?", -3.5),
    *((letter, -4.0 - index / 100) for index, letter in enumerate(string.ascii_lowercase)),
    ("<mask>", 0.0),
]


def make_xlm_roberta_vocab_gguf(bert_gguf: Path, path: Path) -> Path:
    """The tiny BERT's GGUF with the vocabulary llama.cpp's converter writes for an XLM-RoBERTa
    reranker (bge-reranker-v2-m3): a "t5" (unigram) tokenizer over XLM_ROBERTA_PIECES, <s> as BOS,
    </s> as EOS and separator, each added. For vocabulary-only loads: the weights do not fit it."""
    pieces = [piece for piece, _ in XLM_ROBERTA_PIECES]
    control = {"<s>", "<pad>", "</s>", "<mask>"}
    types = [
        TokenType.CONTROL if piece in control else TokenType.UNKNOWN if piece == "<unk>" else TokenType.NORMAL
        for piece in pieces
    ]
    return copy_gguf(
        bert_gguf,
        path,
        {
            "tokenizer.ggml.model": "t5",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": [score for _, score in XLM_ROBERTA_PIECES],
            "tokenizer.ggml.token_type": [int(kind) for kind in types],
            "tokenizer.ggml.bos_token_id": (pieces.index("<s>"), GGUFValueType.UINT32),
            "tokenizer.ggml.eos_token_id": (pieces.index("</s>"), GGUFValueType.UINT32),
            "tokenizer.ggml.seperator_token_id": (pieces.index("</s>"), GGUFValueType.UINT32),
            "tokenizer.ggml.padding_token_id": (pieces.index("<pad>"), GGUFValueType.UINT32),
            "tokenizer.ggml.unknown_token_id": (pieces.index("<unk>"), GGUFValueType.UINT32),
            "tokenizer.ggml.mask_token_id": (pieces.index("<mask>"), GGUFValueType.UINT32),
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": True,
            "tokenizer.ggml.add_sep_token": True,
            "tokenizer.ggml.add_space_prefix": True,
            "tokenizer.ggml.remove_extra_whitespaces": True,
        },
    )


def make_transformers_cross_encoder_dir(directory: Path, seed: int = 0) -> Path:
    """A random BertForSequenceClassification (one relevance score) and its BertTokenizer over the
    tiny vocabulary, saved by transformers as a user's cross-encoder folder is. Its two token-type
    rows are the same: llama.cpp's BERT graph adds the first row to every token, where Hugging Face
    gives a pair's second text the second row."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(seed)
    vocab = tiny_vocab()
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=1,
        initializer_range=0.2,  # wide enough that the documents' scores are far apart
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        token_types = model.bert.embeddings.token_type_embeddings.weight
        token_types[1] = token_types[0]
    model.save_pretrained(directory)
    BertTokenizer(vocab={token: index for index, token in enumerate(vocab)}).save_pretrained(directory)
    return directory


# Text to train the tiny tokenizers on: several scripts, digits, punctuation, so that the tests'
# texts split into many pieces of several kinds.
TRAINING_TEXT = [
    "the sky is blue and the grass is green",
    "why is the sky blue? because of Rayleigh scattering.",
    "hello world, hello everyone; how are you today?",
    "Les élèves étudient à l'école depuis le matin.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El niño come manzanas y naranjas en la mañana.",
    "東京は日本の首都です。京都は古い都です。",
    "Москва — столица России, большой город.",
    "numbers like 1234, 2024 and 3.14159 appear in text",
    "I'll say it's fine; they've done what we'd asked.",
    "search query: what is the capital of France? passage: Paris is the capital.",
    "yes, the answer is yes.",  # a reranker's two answers, each a token of the Qwen BPE vocabulary
    "no, the answer is no.",
]


def make_unigram_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece unigram model trained on TRAINING_TEXT, with its NFKC normaliser (a
    precompiled charsmap) as XLM-RoBERTa's sentencepiece.bpe.model has."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 30),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,  # the same model every run
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def _save_sentence_transformer(directory: Path, pooling: str) -> None:
    """Turn a saved transformers model folder into a sentence-transformers one (modules.json,
    1_Pooling) with the given pooling, written by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(directory))
    pooling_module = Pooling(transformer.get_embedding_dimension(), pooling)
    SentenceTransformer(modules=[transformer, pooling_module], device="cpu").save(str(directory))


def make_transformers_xlm_roberta_dir(
    directory: Path, pooling: str = "cls", classifier: bool = False, seed: int = 0
) -> Path:
    """A random XLM-RoBERTa with a SentencePiece unigram tokenizer, saved by transformers: a
    sentence-transformers embedder with `pooling` ("cls" as bge-m3, "mean" as multilingual-e5), or
    with `classifier` a cross-encoder (XLMRobertaForSequenceClassification, as bge-reranker-v2-m3).
    Positions start at pad_token_id + 1 = 2, as RoBERTa numbers them."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaModel, XLMRobertaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm_dir = directory.parent / f"{directory.name}-sentencepiece"
    spm_dir.mkdir(exist_ok=True)
    make_unigram_sentencepiece(spm_dir / "sentencepiece.bpe.model")
    tokenizer = XLMRobertaTokenizer.from_pretrained(str(spm_dir))  # converted to tokenizer.json as transformers does
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,  # 64 positions past the pad offset, as 514 gives bge-m3 512
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        num_labels=1,
        initializer_range=0.2,  # wide enough that the vectors and scores are far apart
    )
    model = (XLMRobertaForSequenceClassification if classifier else XLMRobertaModel)(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if not classifier:
        _save_sentence_transformer(directory, pooling)
    return directory


def add_bge_m3_heads(directory: Path, seed: int = 0, colbert_dims: int | None = None) -> Path:
    """BGE-M3's sparse and ColBERT heads beside a model folder, random, saved as FlagEmbedding saves
    them: torch.save of each Linear's state dict (sparse_linear.pt: hidden -> 1, colbert_linear.pt:
    hidden -> colbert_dims, the hidden size by default)."""
    import json

    import torch

    hidden = json.loads((directory / "config.json").read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    sparse = torch.nn.Linear(hidden, 1)
    colbert = torch.nn.Linear(hidden, colbert_dims or hidden)
    with torch.no_grad():
        for layer in (sparse, colbert):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.3)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.3)
        # Weights of about BGE-M3's size (tenths), some above zero, so relu keeps some and drops
        # others (a random head scores most tokens of a random model alike).
        sparse.weight.mul_(0.1)
        sparse.bias.fill_(0.1)
    torch.save(sparse.state_dict(), directory / "sparse_linear.pt")
    torch.save(colbert.state_dict(), directory / "colbert_linear.pt")
    return directory


# Qwen2's pre-tokenizer split (Qwen3's tokenizer.json spells it so).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def make_qwen_bpe_tokenizer(directory: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer.json trained on TRAINING_TEXT with Qwen2's pre-tokenizer and
    Qwen3-Embedding's special tokens: its post-processor appends <|endoftext|> to every text while
    tokenizer_config.json names <|im_end|> as the EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 10, trainer)
    end_of_text = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>",
        pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", end_of_text)],
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def make_transformers_qwen3_dir(directory: Path, seed: int = 0) -> Path:
    """A random Qwen3Model with the tiny Qwen BPE tokenizer, as a sentence-transformers embedder
    with last-token pooling (Qwen3-Embedding's layout: 4 query heads sharing 2 key/value heads,
    q/k norms, RoPE)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    make_qwen_bpe_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer) + 8,  # spare rows, as Qwen3's embedding has past its tokens
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    Qwen3Model(config).eval().save_pretrained(directory)
    _save_sentence_transformer(directory, "lasttoken")
    return directory


def make_transformers_qwen3_reranker_dir(directory: Path, seed: int = 0) -> Path:
    """A random Qwen3ForCausalLM with the tiny Qwen BPE tokenizer, in a folder named as
    Qwen3-Reranker's is (the name tells a Qwen3 reranker from a chat model, as for llama.cpp's
    converter): its score is the probability of "yes" against "no" after the rerank prompt."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    make_qwen_bpe_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=1_000_000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    Qwen3ForCausalLM(config).eval().save_pretrained(directory)
    return directory


# ModernBERT's special tokens, added after its BPE vocabulary as its tokenizer.json numbers them.
MODERN_BERT_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
# A token ModernBERT's tokenizer adds that is not special (matched whole in a text, as llama.cpp's
# user-defined tokens are).
MODERN_BERT_ADDED = "|||EMAIL_ADDRESS|||"


def make_modern_bert_bpe_tokenizer(directory: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer.json trained on TRAINING_TEXT laid out as ModernBERT's: NFC, GPT-2's
    split (ByteLevel with its regex, no prefix space), its special tokens after the vocabulary, and a
    post-processor that puts [CLS] before a text and [SEP] after it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 10, trainer)
    tokenizer.add_tokens([AddedToken(MODERN_BERT_ADDED, normalized=False)])
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, lstrip=token == "[MASK]") for token in MODERN_BERT_SPECIALS]
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "mask_token": "[MASK]",
        "unk_token": "[UNK]",
        "model_max_length": 64,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _as_hub_modern_bert_config(directory: Path, global_every: int, global_theta: float, local_theta: float) -> None:
    """Rewrite config.json as ModernBERT configs on the Hub are (modernbert-embed-base's): the global
    layers as global_attn_every_n_layers, the RoPE bases as global_rope_theta and local_rope_theta,
    where transformers 5 saves layer_types and rope_parameters."""
    config = json.loads((directory / "config.json").read_text())
    config.pop("layer_types")
    config.pop("rope_parameters")
    config.update(global_attn_every_n_layers=global_every, global_rope_theta=global_theta, local_rope_theta=local_theta)
    (directory / "config.json").write_text(json.dumps(config))


def make_transformers_modern_bert_dir(
    directory: Path,
    pooling: str = "mean",
    seed: int = 0,
    hub_config: bool = False,
    layer_types: list[str] | None = None,
) -> Path:
    """A random ModernBertModel with the tiny ModernBERT tokenizer, as a sentence-transformers
    embedder with `pooling` ("mean" as modernbert-embed-base, "cls" as gte-modernbert-base): 3 layers,
    the first global and the other two local (global_attn_every_n_layers 2 would make the third
    global too), a local window of 4 tokens either side of 8 so that texts are longer than it, and
    RoPE bases far apart (global 160000, local 10000), as ModernBERT's are. With `hub_config` the
    config is written as on the Hub (global_attn_every_n_layers 3, global_rope_theta, local_rope_theta);
    `layer_types` ("full_attention" or "sliding_attention" per layer) lays the layers out otherwise."""
    import torch
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertModel

    make_modern_bert_bpe_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(seed)
    global_every, global_theta, local_theta = 3, 160_000.0, 10_000.0
    config = ModernBertConfig(
        vocab_size=len(tokenizer) + 6,  # spare rows, as ModernBERT's embedding has past its tokens
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        local_attention=8,
        global_attn_every_n_layers=global_every,
        layer_types=layer_types,
        global_rope_theta=global_theta,
        local_rope_theta=local_theta,
        pad_token_id=tokenizer.convert_tokens_to_ids("[PAD]"),
        cls_token_id=tokenizer.convert_tokens_to_ids("[CLS]"),
        sep_token_id=tokenizer.convert_tokens_to_ids("[SEP]"),
        bos_token_id=tokenizer.convert_tokens_to_ids("[CLS]"),
        eos_token_id=tokenizer.convert_tokens_to_ids("[SEP]"),
        initializer_range=0.2,  # wide enough that the vectors are far apart
    )
    ModernBertModel(config).eval().save_pretrained(directory)
    _save_sentence_transformer(directory, pooling)  # rewrites config.json: the Hub's layout after it
    if hub_config:
        _as_hub_modern_bert_config(directory, global_every, global_theta, local_theta)
    return directory


# nomic-embed-text's RoPE base (rotary_emb_base on the Hub, transformers' NomicBertConfig default).
NOMIC_BERT_ROPE_THETA = 1000.0


def make_transformers_nomic_bert_dir(directory: Path, seed: int = 0) -> Path:
    """A random NomicBertModel (hidden 64, 2 layers, 4 heads, SwiGLU, RoPE base 1000) with the tiny
    WordPiece vocabulary in a BertTokenizer, as a sentence-transformers embedder with mean pooling
    (nomic-embed-text's). Its embedding has 6 rows past the tokenizer's, as nomic-embed-text's has
    (30528 for 30522). transformers 5 writes its own config names and the Hub's weight names
    (encoder.layers.N.attn.Wqkv, mlp.fc11 and fc12, norm1 and norm2, emb_ln)."""
    import torch
    from transformers import BertTokenizer, NomicBertConfig, NomicBertModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    torch.manual_seed(seed)
    config = NomicBertConfig(
        vocab_size=len(vocab) + 6,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,  # no table behind it (RoPE): only the context length written
        type_vocab_size=2,
        rope_parameters={"rope_type": "default", "rope_theta": NOMIC_BERT_ROPE_THETA},
        initializer_range=0.2,  # wide enough that the vectors are far apart
    )
    NomicBertModel(config).eval().save_pretrained(directory)
    BertTokenizer(vocab={token: index for index, token in enumerate(vocab)}).save_pretrained(directory)
    _save_sentence_transformer(directory, "mean")
    return directory


def as_hub_nomic_bert_dir(native: Path, directory: Path) -> Path:
    """The folder `native` with config.json as nomic-embed-text-v1.5's on the Hub (its remote code's
    names: n_embd, n_layer, n_inner, rotary_emb_base, layer_norm_epsilon, n_positions 8192 with
    max_trained_positions 2048, and the switches llama.cpp's converter checks). transformers' own
    NomicBert cannot read it without the remote code: the vectors to match are the native folder's."""
    import shutil

    shutil.copytree(native, directory)
    config = json.loads((native / "config.json").read_text())
    hub = {
        "architectures": ["NomicBertModel"],
        "model_type": "nomic_bert",
        "auto_map": {
            "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
            "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
        },
        "activation_function": "swiglu",
        "n_embd": config["hidden_size"],
        "n_layer": config["num_hidden_layers"],
        "n_head": config["num_attention_heads"],
        "n_inner": config["intermediate_size"],
        "n_positions": 8192,
        "max_trained_positions": 2048,
        "rotary_emb_base": config["rope_parameters"]["rope_theta"],
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None,
        "rotary_scaling_factor": None,
        "layer_norm_epsilon": config["layer_norm_eps"],
        "type_vocab_size": config["type_vocab_size"],
        "vocab_size": config["vocab_size"],
        "causal": False,
        "prenorm": False,
        "parallel_block": False,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "use_rms_norm": False,
        "pad_vocab_size_multiple": 64,
    }
    (directory / "config.json").write_text(json.dumps(hub))
    return directory


def as_separate_qkv_nomic_bert_dir(native: Path, directory: Path) -> Path:
    """The folder `native` with its weights under transformers' own names, from the model's state_dict
    (layers.N.self_attn.q_proj, k_proj, v_proj, mlp.up_proj, gate_proj, post_attention_layernorm),
    which transformers loads as they are."""
    import shutil

    from safetensors.torch import save_file as save_torch_file
    from transformers import NomicBertModel

    shutil.copytree(native, directory)
    state = NomicBertModel.from_pretrained(str(native)).state_dict()
    save_torch_file({name: tensor.contiguous() for name, tensor in state.items()}, str(directory / "model.safetensors"))
    return directory
