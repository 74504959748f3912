"""Small real models for tests: a Hugging Face BERT directory with random weights, made in
milliseconds, which emberd converts to GGUF like any other model."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
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
) -> Path:
    """Write config.json, vocab.txt, model.safetensors and 1_Pooling/config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    intermediate = hidden * 2
    config = {
        "architectures": ["BertModel"],
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
