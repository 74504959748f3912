"""The model shapes of bench_sizes.py: their FLOPs, their texts, their folders, and its torch worker.

The driver (bench_sizes.py, emberd's .venv) imports this module for the shapes and the texts; the
same file runs as a script in .venv-bench, where torch lives:

    .venv-bench/bin/python benchmarks/size_shapes.py make-hf DIR SHAPE MINILM_DIR
        a random-weight BERT folder of SHAPE (base, large) that sentence-transformers loads (mean pooling)
    .venv-bench/bin/python benchmarks/size_shapes.py torch-worker MODEL_DIR THREADS
        sentence-transformers in-process, driven by JSON lines on stdin, one JSON line out per command
    .venv/bin/python benchmarks/size_shapes.py sgemm THREADS REPEATS
        the attainable fp32 rate: numpy's 4096 x 4096 matmul, best of REPEATS (set the BLAS's
        *_NUM_THREADS in the environment too: some read it only when they load)

Only the standard library is imported at the top: torch and transformers are imported by the two
commands that need them, in the venv that has them.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHORT_WORDS = 12  # + [CLS] and [SEP]: 14 tokens, the peers' W1 query
PASSAGE_WORDS = 64  # 66 tokens, the peers' W3 passage
BATCH_SIZE = 32


@dataclass(frozen=True)
class Shape:
    """A BERT encoder's dimensions; `real` is True for the trained all-MiniLM, False for random weights."""

    name: str
    label: str
    hidden: int
    layers: int
    heads: int
    ff: int
    real: bool = False

    @property
    def key(self) -> str:
        """The cache folder's name: a changed dimension makes a new folder, never a stale reuse."""
        return f"{self.name}-h{self.hidden}-l{self.layers}-a{self.heads}-f{self.ff}"

    @property
    def encoder_matmul_params(self) -> int:
        """Weights the encoder multiplies by per token: Q, K, V, output (4 h^2) and the two FF (2 h ff)."""
        return self.layers * (4 * self.hidden * self.hidden + 2 * self.hidden * self.ff)

    def flops_per_token(self, seq_tokens: int) -> float:
        """Useful FLOPs per token of a `seq_tokens`-token text:

            layers x (2 x (4 h^2 + 2 h ff) + 2 x 2 x seq x h)

        The first term is the matmuls against the weights: a multiply and an add (2 FLOPs) per weight
        per token. The second is attention: Q.K^T and the weights times V each take seq x h
        multiply-adds per token. The word-embedding table is a lookup and costs nothing, which is
        why this counts the encoder's matmul weights, not all parameters (all-MiniLM's 22M include
        11.7M of embeddings). Biases, layer norms, GELU, softmax and pooling are O(h) per token and
        left out. `seq` is the text's own length: llama.cpp packs several texts into one decode and
        masks across them, so it does more attention arithmetic than this; the masked part is waste,
        not work, so it is not credited.
        """
        per_layer = 2 * (4 * self.hidden * self.hidden + 2 * self.hidden * self.ff) + 4 * seq_tokens * self.hidden
        return float(self.layers * per_layer)


SHAPES = {
    "minilm": Shape("minilm", "all-MiniLM-L6-v2 (22M)", 384, 6, 12, 1536, real=True),
    "base": Shape("base", "BERT-base (110M, random)", 768, 12, 12, 3072),
    "large": Shape("large", "BERT-large (335M, random)", 1024, 24, 16, 4096),
}

# Common English words; those that are whole entries of the WordPiece vocabulary are one token each,
# so a text of N of them is N + 2 tokens in every tokenizer here (the same vocab.txt everywhere).
WORD_LIST = """the a of and to in is it that for on with as by at from this be are was or an not have has but
they we you all one two three can will would more some when what which their there about out up into over
time year people way day man thing woman life child world school state family student group country problem
hand part place case week company system program question work government number night point home water room
mother area money story fact month lot right study book eye job word business issue side kind head house
service friend father power hour game line end member law car city community name president team minute idea
body information back parent face level office door health person art war history party result change morning
reason research girl moment air teacher force education foot boy age policy process music market sense nation
plan college interest death experience effect use class control care field development role effort rate heart
show leader light voice wife police mind price report decision son view relationship town road arm difference
value building action model season society tax director position player record paper space ground form event
official matter center couple site project activity star table need court oil situation cost industry figure
street image phone data picture practice piece land product doctor wall patient worker news test movie north
love support technology step baby computer type attention film tree source organization hair window evidence
population truth song energy fire garden river mountain ocean forest summer winter evening bridge train station
letter search document server memory network quick brown fox small large green blue red black white old new
good great little big long short high early late young open simple clear strong"""
WORDS = WORD_LIST.split()


def one_token_words(vocab_file: Path) -> list[str]:
    vocab = set(vocab_file.read_text(encoding="utf-8").split("\n"))
    words = [word for word in WORDS if word in vocab]
    if len(words) < 100:
        raise RuntimeError(f"{vocab_file}: only {len(words)} of the bench's words are single tokens")
    return words


def make_texts(words: list[str], count: int, length: int, seed: int) -> list[str]:
    """`count` texts of `length` words, the same every run (a fixed seed)."""
    chooser = random.Random(seed)
    return [" ".join(chooser.choice(words) for _ in range(length)) for _ in range(count)]


def make_hf_folder(directory: Path, shape: Shape, minilm_dir: Path) -> None:
    """A random-weight BertModel of `shape` saved by transformers, with all-MiniLM's WordPiece
    tokenizer and sentence-transformers' module files (mean pooling, then normalisation)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.ff,
        max_position_embeddings=512,
    )
    directory.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(directory)
    for name in (
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
        "config_sentence_transformers.json",
    ):
        if (minilm_dir / name).exists():
            shutil.copy(minilm_dir / name, directory / name)
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    pooling = json.loads((minilm_dir / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = shape.hidden
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def torch_worker(model_dir: Path, threads: int) -> None:
    """sentence-transformers in-process on `threads` threads. Commands, one JSON object a line:
    {"op": "w1", "texts": [...], "seconds": s}: single texts one after another -> {"p50_ms"};
    {"op": "bulk", "batch": [...], "seconds": s}: the batch back to back -> {"texts_per_s"};
    {"op": "embed", "texts": [...]} -> {"vectors"}. One caller: torch already spreads each
    operation over its threads, and a second caller would run a second team on the same cores."""
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(model_dir), device="cpu")
    reply: dict[str, Any] = {
        "ready": True,
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "w1":
            timings: list[float] = []
            texts = command["texts"]
            started = time.perf_counter()
            while time.perf_counter() - started < command["seconds"] or len(timings) < 3:
                text = texts[len(timings) % len(texts)]
                call_started = time.perf_counter()
                model.encode([text], convert_to_numpy=True)
                timings.append(time.perf_counter() - call_started)
            reply = {"p50_ms": statistics.median(timings) * 1000, "count": len(timings)}
        elif command["op"] == "bulk":
            batch = command["batch"]
            done = 0
            started = time.perf_counter()
            while time.perf_counter() - started < command["seconds"] or done == 0:
                model.encode(batch, batch_size=len(batch), convert_to_numpy=True)
                done += len(batch)
            reply = {"texts_per_s": done / (time.perf_counter() - started)}
        elif command["op"] == "embed":
            reply = {"vectors": model.encode(command["texts"], convert_to_numpy=True).tolist()}
        else:
            reply = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(reply), flush=True)


def sgemm(threads: int, repeats: int, size: int = 4096) -> dict[str, Any]:
    """GFLOP/s of the best of `repeats` float32 `size` x `size` matmuls on `threads` BLAS threads
    (2 size^3 FLOPs each), and the BLAS that numpy used."""
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits  # type: ignore[import-untyped]

    rng = np.random.default_rng(0)
    left = rng.standard_normal((size, size), dtype=np.float32)
    right = rng.standard_normal((size, size), dtype=np.float32)
    with threadpool_limits(limits=threads):
        np.matmul(left, right)  # the first call pages in the BLAS and its buffers
        best_s = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            np.matmul(left, right)
            best_s = min(best_s, time.perf_counter() - started)
        blas = [
            f"{pool['internal_api']} {pool['version']} ({pool['num_threads']} threads)" for pool in threadpool_info()
        ]
    return {"gflops": 2 * size**3 / best_s / 1e9, "blas": ", ".join(blas)}


def main() -> None:
    if sys.argv[1] == "make-hf":
        make_hf_folder(Path(sys.argv[2]), SHAPES[sys.argv[3]], Path(sys.argv[4]))
    elif sys.argv[1] == "torch-worker":
        torch_worker(Path(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "sgemm":
        print(json.dumps(sgemm(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}: make-hf, torch-worker or sgemm")


if __name__ == "__main__":
    main()
