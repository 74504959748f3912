"""The model store: names -> manifests -> content-addressed blobs, under EMBERD_HOME/models.

Layout:
    models/blobs/sha256-<hex>              GGUF files, named by their content
    models/manifests/<name>/<tag>.json     one per model name, pointing at a blob (and at the blobs of
                                           its task adapters, if it has any: see daemon.adapters)
    tmp/                                   partial files; same filesystem, so publishing is a rename

Nothing is ever written in place: a blob or manifest appears under its final name by an atomic
rename after its content is complete and fsynced, so a crash leaves no half-written model.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.adapters import AdapterHeader, check_adapters, read_adapter_header
from daemon.durable import fsync_directory
from daemon.errors import (
    BlobMissing,
    InsufficientDisk,
    InvalidModelFile,
    ModelLoadFailed,
    ModelNotLoadable,
    NotEmbeddingModel,
    UnknownModel,
    UnreadableManifest,
    UnsupportedModelFile,
)
from daemon.gguf_info import GGUFFacts, cached_gguf_facts, read_gguf_header, read_tensor_shapes
from daemon.heads import Heads, read_head_files, read_heads, write_heads
from daemon.jobs import NEVER_CANCELLED, CancelToken
from daemon.names import canonical_name
from daemon.prompts import ModelPrompts, merge_prompts, read_sentence_transformers_prompts
from daemon.typed_vectors import QuantizationRanges

_COPY_CHUNK_BYTES = 4 * 1024 * 1024
# The manifest layout this version writes; it reads this one and older ones (see _read_manifest).
SCHEMA_VERSION = 1
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_FACT_FIELDS = {f.name for f in dataclasses.fields(GGUFFacts)}
# A download no pull has touched for this long is abandoned: removed at start-up.
ABANDONED_DOWNLOAD_S = 7 * 86400
log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def digests_named_in(value: object) -> set[str]:
    """Every "sha256:<64 hex>" string anywhere in a manifest's JSON: the model's blob, its adapters',
    and those of fields a newer emberd may add, so the garbage collection of this version keeps
    them all."""
    if isinstance(value, str):
        return {value} if _DIGEST.fullmatch(value) else set()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return set().union(*(digests_named_in(item) for item in items))


@dataclass(frozen=True)
class StoredAdapter:
    """A task adapter a model carries (a LoRA GGUF blob, see daemon.adapters)."""

    task: str
    digest: str  # "sha256:<hex>"
    size_bytes: int
    blob_path: Path
    prompt_prefix: str = ""  # put before each input of this task
    alpha: float = 0.0  # adapter.lora.alpha, as its header says (llama.cpp applies it)


@dataclass(frozen=True)
class StoredHeads:
    """BGE-M3's sparse and ColBERT heads a model carries: an .npz blob (see daemon.heads)."""

    digest: str  # "sha256:<hex>"
    size_bytes: int
    blob_path: Path


# An adapter to store: a GGUF file, and its task where its header names none (or to check it).
AdapterSource = tuple[Path, str | None]


@dataclass(frozen=True)
class StoredModel:
    name: str  # canonical, "all-minilm:latest"
    digest: str  # "sha256:<hex>"
    size_bytes: int
    modified_at: str  # RFC 3339
    blob_path: Path
    facts: GGUFFacts
    prompts: ModelPrompts = field(default_factory=ModelPrompts)
    adapters: tuple[StoredAdapter, ...] = ()
    default_task: str | None = None  # the adapter a request that names no task gets (None: the base model)
    # int8/uint8 ranges (daemon.calibration); None until calibrated.
    quantization_ranges: QuantizationRanges | None = None
    heads: StoredHeads | None = None  # BGE-M3's sparse and ColBERT heads (None: the model has none)

    @property
    def adapter_bytes(self) -> int:
        """What its adapters' files hold: llama.cpp reads them into buffers of about that size."""
        return sum(adapter.size_bytes for adapter in self.adapters)

    @property
    def task_prefixes(self) -> dict[str, str]:
        return {adapter.task: adapter.prompt_prefix for adapter in self.adapters}


class ModelStore:
    def __init__(self, home: Path, vocabulary_refusal: Callable[[Path], str | None] | None = None) -> None:
        self.models_dir = home / "models"
        self.blobs_dir = self.models_dir / "blobs"
        self.manifests_dir = self.models_dir / "manifests"
        self.tmp_dir = home / "tmp"
        # Downloads in progress; kept across restarts so a pull resumes where it broke off.
        self.downloads_dir = home / "downloads"
        self._lock = threading.Lock()
        # Why llama.cpp cannot load a file's architecture or vocabulary (None: it can), asked before
        # a file becomes a blob (the daemon's: runner.client.vocabulary_refusal); None: not asked.
        self._vocabulary_refusal = vocabulary_refusal

    def open(self, now_s: float | None = None) -> None:
        """Create the layout and clean what a previous run left behind: partial files, blobs no
        manifest names, and downloads untouched for ABANDONED_DOWNLOAD_S (a recent one is kept, so
        a pull resumes where it broke off)."""
        for directory in (self.blobs_dir, self.manifests_dir, self.tmp_dir, self.downloads_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            _remove(leftover)
        named = self._named_blobs()
        if named is None:
            log.warning("keeping every blob: a manifest could not be parsed (see above), so it may name any of them")
        else:
            for blob in self.blobs_dir.iterdir():
                if blob.name.startswith("sha256-") and blob.name not in named:
                    log.info("removing %s: no manifest names it", blob.name)
                    blob.unlink(missing_ok=True)
        now_s = time.time() if now_s is None else now_s
        for download in self.downloads_dir.iterdir():
            touched_s = max((p.stat().st_mtime for p in [download, *download.rglob("*")]), default=0.0)
            if now_s - touched_s > ABANDONED_DOWNLOAD_S:
                log.info(
                    "removing the download %s: untouched for %.0f days", download.name, (now_s - touched_s) / 86400
                )
                _remove(download)

    # -- reading ---------------------------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        model, _, tag = name.partition(":")
        return self.manifests_dir.joinpath(*model.split("/"), f"{tag}.json")

    def _read_manifest(self, path: Path) -> StoredModel:
        """A manifest as this version reads it: fields added since it was written take their
        defaults, fields it no longer knows are ignored (older and newer stores stay readable)."""
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version = manifest.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UnreadableManifest(f"{path}: schema_version {version!r} is newer than this emberd's {SCHEMA_VERSION}")
        digest = manifest["digest"]
        facts = {key: value for key, value in manifest["facts"].items() if key in _FACT_FIELDS}
        return StoredModel(
            name=manifest["name"],
            digest=digest,
            size_bytes=manifest["size"],
            modified_at=manifest["modified_at"],
            blob_path=self.blobs_dir / digest.replace(":", "-"),
            facts=GGUFFacts(**{**facts, "metadata": {}, "layer_bytes": tuple(facts.get("layer_bytes", ()))}),
            prompts=ModelPrompts.from_manifest(manifest),
            adapters=tuple(
                StoredAdapter(
                    entry["task"],
                    entry["digest"],
                    entry["size"],
                    self.blobs_dir / entry["digest"].replace(":", "-"),
                    entry.get("prompt_prefix") or "",
                    float(entry.get("alpha") or 0.0),
                )
                for entry in manifest.get("adapters") or []
            ),
            default_task=manifest.get("default_task"),
            quantization_ranges=QuantizationRanges.from_manifest(manifest.get("quantization_ranges")),
            heads=self._heads_of(manifest.get("heads")),
        )

    def _heads_of(self, entry: Any) -> StoredHeads | None:
        if not isinstance(entry, dict):
            return None
        return StoredHeads(entry["digest"], entry["size"], self.blobs_dir / entry["digest"].replace(":", "-"))

    def _named_blobs(self) -> set[str] | None:
        """The blob file names that some manifest file names, readable by this version or not (one
        from a newer emberd still owns its blobs, whatever field names them: a downgrade and an
        upgrade lose nothing). None when a manifest cannot be parsed at all, or names no model blob:
        it may name any blob, so none is garbage."""
        named: set[str] = set()
        for folder, _subfolders, files in os.walk(self.manifests_dir):
            for path in (Path(folder) / file for file in files if file.endswith(".json")):
                try:
                    manifest = json.loads(path.read_bytes())
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as error:
                    log.warning("cannot parse the manifest %s (%s): it may name any blob", path, error)
                    return None
                digests = digests_named_in(manifest)
                if not isinstance(manifest, dict) or manifest.get("digest") not in digests:
                    log.warning("the manifest %s names no sha256 digest: it may name any blob", path)
                    return None
                named.update(digest.replace(":", "-") for digest in digests)
        return named

    def get(self, name: str) -> StoredModel:
        """The stored model for a name; UnknownModel if there is none."""
        canonical = canonical_name(name)
        path = self._manifest_path(canonical)
        try:
            return self._read_manifest(path)
        except FileNotFoundError:  # none, or a delete removed it (reads take no lock)
            raise UnknownModel(f'model "{name}" not found, try pulling it first') from None

    def list(self) -> list[StoredModel]:
        """Every model whose manifest this version can read; others are logged and skipped (their
        blobs are kept: see _named_blobs). Reads
        take no lock: a manifest or folder a delete removes during the walk is simply not listed."""
        models = []
        for folder, _subfolders, files in os.walk(self.manifests_dir):  # skips folders that vanish
            for path in (Path(folder) / file for file in files if file.endswith(".json")):
                try:
                    models.append(self._read_manifest(path))
                except FileNotFoundError:
                    continue
                except (UnreadableManifest, ValueError, KeyError, TypeError) as error:
                    log.warning("skipping the manifest %s: %s", path, error)
        return sorted(models, key=lambda model: model.modified_at, reverse=True)

    # -- writing ---------------------------------------------------------------------------------

    def _publish_blob(self, partial: Path, digest_hex: str) -> Path:
        """Move a complete, fsynced partial file into the blobs directory under its digest."""
        blob = self.blobs_dir / f"sha256-{digest_hex}"
        if blob.exists():
            partial.unlink()
        else:
            os.replace(partial, blob)
            fsync_directory(self.blobs_dir)
        return blob

    def _write_manifest(
        self,
        name: str,
        blob: Path,
        facts: GGUFFacts,
        source: str,
        prompts: ModelPrompts,
        adapters: Sequence[StoredAdapter] = (),
        default_task: str | None = None,
        heads_hex: str | None = None,
    ) -> StoredModel:
        digest = "sha256:" + blob.name.removeprefix("sha256-")
        modified_at = datetime.now(UTC).isoformat()
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "digest": digest,
            "size": blob.stat().st_size,
            "modified_at": modified_at,
            "source": source,
            "facts": {k: v for k, v in dataclasses.asdict(facts).items() if k != "metadata"},
            **prompts.as_manifest(),
            **prompts.conventions_as_manifest(),  # the alias's append_eos (acted on), card pooling/normalize
        }
        if adapters:  # only then: a manifest without them reads as it always did
            manifest["adapters"] = [
                {
                    "task": adapter.task,
                    "digest": adapter.digest,
                    "size": adapter.size_bytes,
                    "prompt_prefix": adapter.prompt_prefix,
                    "alpha": adapter.alpha,
                }
                for adapter in adapters
            ]
            manifest["default_task"] = default_task
        if heads_hex is not None:  # only then, as for adapters
            heads_blob = self.blobs_dir / f"sha256-{heads_hex}"
            manifest["heads"] = {"digest": f"sha256:{heads_hex}", "size": heads_blob.stat().st_size}
        path = self._manifest_path(name)
        self._write_json(path, manifest, name)
        return self._read_manifest(path)

    def record_quantization_ranges(self, name: str, digest: str, ranges: QuantizationRanges) -> bool:
        """Add a model's int8/uint8 ranges to its manifest, if it still names the blob `digest` that
        was calibrated (a model re-created meanwhile keeps none). Returns whether they were written."""
        path = self._manifest_path(canonical_name(name))
        with self._lock:
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return False
            if manifest.get("digest") != digest:
                return False
            manifest["quantization_ranges"] = ranges.as_manifest()
            self._write_json(path, manifest, name)
        return True

    def _write_json(self, path: Path, manifest: dict[str, Any], name: str) -> None:
        """Write a manifest whole or not at all: a temporary file, fsynced, renamed over the old one."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.tmp_dir, delete=False, encoding="utf-8") as handle:
                try:
                    json.dump(manifest, handle, indent=2)
                    handle.flush()
                    os.fsync(handle.fileno())
                except BaseException:
                    Path(handle.name).unlink(missing_ok=True)  # no half-written manifest left in tmp/
                    raise
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            # The blob stays (complete and verified): a pull or create after freeing space names it.
            raise InsufficientDisk(
                f"no space left on device in {self.models_dir} to write the manifest of {name}; free some space"
                " and try again"
            ) from None
        os.replace(handle.name, path)
        fsync_directory(path.parent)

    def _hash_copy(self, source: Path, partial: Path, token: CancelToken) -> str:
        digest = hashlib.sha256()
        with source.open("rb") as reader, partial.open("wb") as writer:
            while chunk := reader.read(_COPY_CHUNK_BYTES):
                token.check()
                digest.update(chunk)
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        return digest.hexdigest()

    @staticmethod
    def hash_file(path: Path, token: CancelToken = NEVER_CANCELLED) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as reader:
            while chunk := reader.read(_COPY_CHUNK_BYTES):
                token.check()
                digest.update(chunk)
        return digest.hexdigest()

    def check_source(self, source: Path) -> GGUFFacts | None:
        """Fail fast (before any streaming) when `source` cannot become an embedding model; a GGUF
        file's header facts (None for a directory, whose are known once converted)."""
        try:
            source.stat()
        except (OSError, ValueError):  # none, or a name the OS refuses (too long, a NUL byte)
            raise InvalidModelFile(f"{str(source)[:200]}: no such file or directory") from None
        if source.is_dir():
            from daemon.convert import inspect_hf_directory  # safetensors and gguf's writer: when needed

            inspect_hf_directory(source)
            return None
        if source.is_file():
            # Cached: /api/create checks before it streams, then the creation job checks again.
            facts = cached_gguf_facts(source)
            require_embedding_model(facts, source.name)
            return facts
        raise InvalidModelFile(f"{source}: no such file or directory")

    @staticmethod
    def check_adapter_sources(
        adapters: Sequence[AdapterSource],
        architecture: str | None = None,
        default_task: str | None = None,
        model: Path | None = None,
    ) -> Sequence[AdapterHeader]:
        """Fail fast when task adapters cannot go with a model: each a LoRA GGUF, one per task, of
        the model's `architecture` (None: not known yet, a directory's before it is converted), with
        tensors that fit those of the `model` GGUF (None: not known yet), and `default_task` one of
        their tasks."""
        headers = [read_adapter_header(path, task) for path, task in adapters]
        model_shapes = read_tensor_shapes(model) if model is not None and adapters else None
        check_adapters(headers, [path.name for path, _task in adapters], architecture, model_shapes)
        if default_task is not None and default_task not in {header.task for header in headers}:
            tasks = ", ".join(sorted(header.task for header in headers)) or "none"
            raise InvalidModelFile(f"default_task {default_task!r} is not one of the adapters' tasks: {tasks}")
        return headers

    def _store_adapters(
        self, adapters: Sequence[AdapterSource], token: CancelToken
    ) -> Sequence[tuple[str, str | None]]:
        """Each adapter file copied into the blobs: (digest hex, task) of each."""
        stored = []
        for path, task in adapters:
            fd, partial_name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".partial")
            os.close(fd)
            partial = Path(partial_name)
            try:
                digest_hex = self._hash_copy(path, partial, token)
                self.adopt_blob(partial, digest_hex)
            finally:
                partial.unlink(missing_ok=True)
            stored.append((digest_hex, task))
        return stored

    def check_loadable(self, path: Path, label: str) -> None:
        """Refuse a file whose architecture or vocabulary llama.cpp cannot load, in its words."""
        reason = self._vocabulary_refusal(path) if self._vocabulary_refusal is not None else None
        if reason is not None:
            raise UnsupportedModelFile(f"{label}: this emberd's llama.cpp cannot load it: {reason}")

    def create(
        self,
        name: str,
        source: Path,
        output_type: str = "f16",
        progress: Callable[[str], None] = lambda _status: None,
        token: CancelToken = NEVER_CANCELLED,
        prompts: ModelPrompts | None = None,
        adapters: Sequence[AdapterSource] = (),
        default_task: str | None = None,
    ) -> StoredModel:
        """Register a GGUF file, or convert a Hugging Face directory, under `name`. Blocking; a
        cancelled `token` stops it at the next chunk or tensor, leaving nothing behind. `prompts`
        add to (and override) those a sentence-transformers directory carries. `adapters`: task
        adapters (LoRA GGUFs) stored beside it, see daemon.adapters."""
        prompts = prompts or ModelPrompts()
        canonical = canonical_name(name)
        source_facts = self.check_source(source)
        headers = self.check_adapter_sources(
            adapters,
            source_facts.architecture if source_facts else None,
            default_task,
            source if source_facts else None,  # a GGUF file's tensors are known already
        )
        fd, partial_name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".partial")
        os.close(fd)
        partial = Path(partial_name)
        heads_hex: str | None = None
        try:
            if source.is_dir():
                progress(f"converting {source.name} to gguf ({output_type})")
                from daemon.convert import convert_hf_directory

                convert_hf_directory(source, partial, output_type, canonical.split(":")[0], progress, token)
                prompts = merge_prompts(read_sentence_transformers_prompts(source), prompts)
                with partial.open("rb+") as handle:
                    os.fsync(handle.fileno())
                progress("computing sha256 digest")
                digest_hex = self.hash_file(partial, token)
            else:
                progress("copying gguf into the store")
                digest_hex = self._hash_copy(source, partial, token)
            try:
                facts, tensor_shapes = read_gguf_header(partial)
            except InvalidModelFile as refusal:  # named after the source, not the partial file
                raise type(refusal)(f"{source.name}: {refusal.message.removeprefix(partial.name + ': ')}") from None
            require_embedding_model(facts, source.name)
            self.check_loadable(partial, source.name)  # the bytes stored, in a runner of their own
            if source.is_dir() and (heads := read_heads(source, facts.embedding_length)) is not None:
                heads_hex = self.store_heads(heads)  # BGE-M3's, once the converted model is known to load
            stored_adapters: Sequence[tuple[str, str | None]] = ()
            if adapters:  # the headers read above, against the stored bytes' architecture and tensors
                labels = [path.name for path, _task in adapters]
                check_adapters(headers, labels, facts.architecture, tensor_shapes)
                progress("copying adapters into the store")
                stored_adapters = self._store_adapters(adapters, token)
            progress("writing manifest")
            return self.publish(
                canonical, partial, digest_hex, str(source), prompts, stored_adapters, default_task, heads_hex
            )
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise InsufficientDisk(f"no space left in {self.models_dir} to create {canonical}") from None
            raise InvalidModelFile(f"cannot create {canonical} from {source}: {error}") from None
        finally:
            partial.unlink(missing_ok=True)

    def publish(
        self,
        name: str,
        partial: Path,
        digest_hex: str,
        source: str,
        prompts: ModelPrompts | None = None,
        adapters: Sequence[tuple[str, str | None]] = (),
        default_task: str | None = None,
        heads_hex: str | None = None,
    ) -> StoredModel:
        """Make a complete, fsynced file the blob of `name` (with the adapter blobs `adapters` names,
        and the heads blob `heads_hex` names)."""
        self.adopt_blob(partial, digest_hex)
        return self.publish_blob(name, digest_hex, source, prompts, adapters, default_task, heads_hex)

    def adopt_blob(self, complete: Path, digest_hex: str) -> None:
        """Move a complete file, whose sha256 was checked, into the blobs (same filesystem)."""
        with complete.open("rb+") as handle:
            os.fsync(handle.fileno())
        with self._lock:
            self._publish_blob(complete, digest_hex)

    def publish_blob(
        self,
        name: str,
        digest_hex: str,
        source: str,
        prompts: ModelPrompts | None = None,
        adapters: Sequence[tuple[str, str | None]] = (),
        default_task: str | None = None,
        heads_hex: str | None = None,
    ) -> StoredModel:
        """Point `name` at an existing blob (and its task adapters at theirs: (digest hex, task),
        each header checked against the model; its heads at the blob `heads_hex` names). Any GGUF
        is accepted: a download may bring a model without pooling, which /api/embed then refuses
        with its own error."""
        canonical = canonical_name(name)
        blob = self.blobs_dir / f"sha256-{digest_hex}"
        # Under the lock a delete takes too: a delete that came first removed the blob (this fails,
        # and no manifest names a missing blob); one that comes after sees this manifest and keeps it.
        with self._lock:
            heads_needed = [heads_hex] if heads_hex is not None else []
            for needed in [digest_hex, *(adapter_hex for adapter_hex, _task in adapters), *heads_needed]:
                if not (self.blobs_dir / f"sha256-{needed}").is_file():
                    raise BlobMissing(f"the blob sha256:{needed} was deleted before {canonical} could name it")
            facts, tensor_shapes = read_gguf_header(blob)
            stored_adapters = self._adapters_of(facts, tensor_shapes, adapters, default_task)
            return self._write_manifest(
                canonical, blob, facts, source, prompts or ModelPrompts(), stored_adapters, default_task, heads_hex
            )

    def _adapters_of(
        self,
        facts: GGUFFacts,
        tensor_shapes: dict[str, tuple[int, ...]],
        adapters: Sequence[tuple[str, str | None]],
        default_task: str | None,
    ) -> Sequence[StoredAdapter]:
        """The adapter blobs `adapters` names, their headers checked against the model's (its header
        `facts` and `tensor_shapes`): its architecture and its tensors."""
        paths = [(self.blobs_dir / f"sha256-{adapter_hex}", task) for adapter_hex, task in adapters]
        headers = self.check_adapter_sources(paths, None, default_task)
        check_adapters(headers, [header.task for header in headers], facts.architecture, tensor_shapes)
        return [
            StoredAdapter(
                header.task, f"sha256:{adapter_hex}", path.stat().st_size, path, header.prompt_prefix, header.alpha
            )
            for header, (adapter_hex, _task), (path, _same) in zip(headers, adapters, paths, strict=True)
        ]

    def store_heads_files(self, sparse_file: Path, colbert_file: Path, gguf: Path) -> str:
        """Heads from their two torch files (a pull's, see daemon.heads), checked against the model
        blob `gguf`'s width, as a blob: its digest hex."""
        hidden = read_gguf_header(gguf)[0].embedding_length
        return self.store_heads(read_head_files(sparse_file, colbert_file, hidden))

    def store_heads(self, heads: Heads) -> str:
        """Heads written as an .npz blob (daemon.heads.write_heads): its digest hex."""
        fd, partial_name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".partial")
        partial = Path(partial_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                write_heads(heads, handle)
            digest_hex = self.hash_file(partial)
            self.adopt_blob(partial, digest_hex)
        finally:
            partial.unlink(missing_ok=True)
        return digest_hex

    def has_blob(self, digest_hex: str) -> bool:
        return (self.blobs_dir / f"sha256-{digest_hex}").is_file()

    def download_dir(self, digest_hex: str) -> Path:
        return self.downloads_dir / digest_hex

    def delete(self, name: str) -> StoredModel:
        """Remove a name; its blob goes too unless another name still uses it."""
        model = self.get(name)
        with self._lock:
            path = self._manifest_path(model.name)
            try:
                path.unlink()
            except FileNotFoundError:  # another delete of this name came first
                raise UnknownModel(f'model "{name}" not found') from None
            for parent in path.parents:
                if parent == self.manifests_dir or any(parent.iterdir()):
                    break
                parent.rmdir()
            named = self._named_blobs()
            heads = [model.heads.blob_path] if model.heads is not None else []
            for blob in [model.blob_path, *(adapter.blob_path for adapter in model.adapters), *heads]:
                if named is not None and blob.name not in named:
                    blob.unlink(missing_ok=True)
        return model


def loadable_facts(model: StoredModel) -> GGUFFacts:
    """A stored model's header facts, with today's checks, before a runner or its vocabulary is
    loaded (cached_gguf_facts: read again only if the file changed). A check that foresees llama.cpp
    refusing or aborting on the file is ModelNotLoadable; a file damaged since it was stored,
    ModelLoadFailed; a file deleted meanwhile keeps the manifest's facts (the runner's start then
    says it is gone)."""
    try:
        return cached_gguf_facts(model.blob_path)
    except UnsupportedModelFile as refusal:
        reason = refusal.message.removeprefix(f"{model.blob_path.name}: ")
        raise ModelNotLoadable(f"{model.name} cannot be loaded by this emberd's llama.cpp: {reason}") from None
    except InvalidModelFile as damage:
        if not model.blob_path.is_file():
            return model.facts
        raise ModelLoadFailed(f"failed to load {model.name}: {damage.message}") from None


def require_embedding_model(facts: GGUFFacts, label: str) -> GGUFFacts:
    if not facts.is_embedding_model and not facts.is_reranker:
        raise NotEmbeddingModel(
            f"{label}: {facts.architecture} model has no pooling type in its GGUF, so it is not an embedding model"
        )
    return facts
