"""emberd: a local embedding daemon speaking Ollama's API on llama.cpp."""

__version__ = "0.1.0"
