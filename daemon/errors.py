"""Domain errors. Each API dialect maps them to a status code and body in one table."""

from __future__ import annotations


class EmberdError(Exception):
    """Base of every error the daemon reports to a client. The message is shown as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidConfig(EmberdError):
    """A setting in the file, environment or flags is wrong."""


class InvalidInput(EmberdError):
    """The request is malformed or asks for something impossible."""


class MissingBody(InvalidInput):
    """The request has no body at all."""


class InvalidModelName(InvalidInput):
    """A name that is not a valid model name (it could escape the store, or is too long)."""


class UnknownModel(EmberdError):
    """The name is valid but no such model is in the store."""


class UnknownObject(EmberdError):
    """No file or batch has that id (OpenAI's Batch API)."""


class BatchDatabaseUnavailable(EmberdError):
    """The batch database (batch_database_url) cannot be reached; try again."""


class UploadTooLarge(EmberdError):
    """An uploaded file is larger than max_upload_bytes."""


class NotEmbeddingModel(EmberdError):
    """The model exists but cannot produce embeddings (no pooling in its GGUF)."""


class InvalidModelFile(InvalidInput):
    """A file or directory given to create is not a usable embedding model."""


class UnsupportedModelFile(InvalidModelFile):
    """A well-formed GGUF that the pinned llama.cpp cannot load, or aborts on (its architecture or
    vocabulary: a header check or a vocabulary-only load says so)."""


class ContextExceeded(InvalidInput):
    """An input is longer than the context and truncation was refused or impossible."""


class InvalidEmbedding(InvalidInput):
    """The model produced NaN or Inf values."""


class Overloaded(EmberdError):
    """Too many requests are waiting: back-pressure before any work is done."""


class InsufficientMemory(EmberdError):
    """The model does not fit in memory even after unloading every idle model."""


class MemoryBusy(EmberdError):
    """The memory a model needs is held by busy models, and they did not free it in time."""


class ModelLoadFailed(EmberdError):
    """The runner could not load the model."""


class ModelNotLoadable(ModelLoadFailed):
    """A stored model the pinned llama.cpp cannot load (stored before a check that now refuses it):
    its architecture, vocabulary or a task adapter, not the runner or the machine, is the reason."""


class RunnerCrashed(EmberdError):
    """The runner process died while it held this request."""


class ShuttingDown(EmberdError):
    """The daemon is draining and takes no new work."""


class HubUnavailable(EmberdError):
    """The Hub cannot be used: offline mode, or it could not be reached."""


class DownloadFailed(EmberdError):
    """A download broke off for good, or its content did not match the Hub's sha256."""


class InsufficientDisk(EmberdError):
    """Not enough free disk in EMBERD_HOME for a download."""


class TooManyInputs(InvalidInput):
    """A request carries more inputs than max_inputs allows."""


class TooManyTokens(TooManyInputs):
    """A request's inputs may hold more tokens than max_request_tokens allows (a 413 too)."""


class UnreadableManifest(EmberdError):
    """A manifest this version cannot read (written by a newer emberd)."""


class BlobMissing(EmberdError):
    """A blob a manifest was about to name was deleted meanwhile (a pull then downloads it again)."""


class AddressInUse(EmberdError):
    """The address to listen on is taken (by Ollama, most often, on 11434)."""


class Unauthorized(EmberdError):
    """API keys are on and the request has no valid `Authorization: Bearer KEY`."""


class ForbiddenHost(EmberdError):
    """A Host header that is not local reached a loopback-bound daemon (DNS rebinding)."""
