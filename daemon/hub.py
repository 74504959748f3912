"""The Hugging Face Hub: which file a name means, and downloading it (through huggingface_hub).

Resolution policy (aliases, tag -> file) is pure and table-tested; `HubClient` does the blocking
HTTP through huggingface_hub (daemon.hub_http, imported at the first pull: it costs the daemon about
9 MiB of memory), which honours HF_TOKEN for gated repos and resumes cut transfers. The import goes
one way: hub_http knows nothing of this module, and is handed the words its errors end with.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.errors import DownloadFailed, HubUnavailable, InvalidConfig, InvalidInput, UnknownModel
from daemon.heads import HEAD_FILES
from daemon.jobs import NEVER_CANCELLED, CancelToken
from daemon.names import canonical_name, parse_hub_name
from daemon.prompts import ModelPrompts, check_card_conventions, check_prompts

log = logging.getLogger(__name__)

# With no tag, the file to prefer for embeddings: full precision first, then the best quant.
PREFERRED_QUANTS = ("F16", "FP16", "BF16", "Q8_0", "F32", "FP32")
_QUANT_ALIASES = {"FP16": "F16", "FP32": "F32"}
_SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
OFFLINE_HINT = "copy the model here and register it with `emberd create NAME --from PATH`"
# Attempts per download: a cut connection resumes from the bytes already on disk.
TRANSFER_ATTEMPTS = 4
# The wait before attempt n + 1 is drawn between 0 and min(cap, first x 2^(n - 1)) ("full jitter"): a
# Hub or CDN that is struggling is not asked again at once, nor by every daemon at the same moment.
RETRY_FIRST_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 30.0
OFFLINE_MESSAGE = (
    f"the Hugging Face Hub is not reachable in offline mode (HF_HUB_OFFLINE / hub_offline); {OFFLINE_HINT}"
)


# The fields an alias may have (configs/models.toml).
ALIAS_FIELDS = (
    "repo", "file", "revision", "sha256", "prompts", "default_prompt_name", "append_eos", "pooling", "normalize",
    "adapters", "default_task", "heads_repo", "heads_revision",
)  # fmt: skip


@dataclass(frozen=True)
class AliasEntry:
    repo_id: str
    filename: str | None  # None: picked from the repo like an hf.co name without a tag
    revision: str
    sha256: str | None
    prompts: ModelPrompts = field(default_factory=ModelPrompts)  # the model card's prompts and conventions
    # Task adapters: files of the same repo and revision (daemon.adapters), their tasks from their headers.
    adapters: tuple[str, ...] = ()
    default_task: str | None = None
    # BGE-M3's sparse and ColBERT heads (daemon.heads): the repo that holds them, pulled with the GGUF.
    heads_repo: str | None = None
    heads_revision: str = "main"


@dataclass(frozen=True)
class HubFile:
    """One file of one commit of one repo: what a pull downloads."""

    repo_id: str
    filename: str
    revision: str  # a commit hash once resolved
    sha256: str  # the Hub's LFS hash, checked before the blob is published
    size_bytes: int
    prompts: ModelPrompts = field(default_factory=ModelPrompts)  # from the alias, if any
    adapters: tuple[HubFile, ...] = ()  # the alias's task adapters, pulled with the model
    default_task: str | None = None
    heads: tuple[HubFile, ...] = ()  # the alias's heads files (sparse_linear.pt, colbert_linear.pt)

    @property
    def source(self) -> str:
        return f"hf.co/{self.repo_id}@{self.revision}/{self.filename}"


def load_aliases(path: Path) -> dict[str, AliasEntry]:
    """configs/models.toml: one table per model name, e.g. ["all-minilm:latest"], with repo, revision,
    and optionally file, sha256, prompts (a table of name = text), default_prompt_name, and the model
    card's append_eos, pooling and normalize (see daemon.prompts), and adapters (task adapter files
    of the repo, see daemon.adapters) with default_task, and heads_repo (with heads_revision: the
    repo holding BGE-M3's sparse_linear.pt and colbert_linear.pt, see daemon.heads). A field it
    does not know is an error, so a misspelt one is not silently ignored."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise InvalidConfig(f"cannot read aliases file {path}: {error}") from None
    aliases: dict[str, AliasEntry] = {}
    for name, entry in document.items():
        unknown = sorted(set(entry) - set(ALIAS_FIELDS)) if isinstance(entry, dict) else []
        if unknown:
            raise InvalidConfig(
                f"{path}: alias {name!r} has an unknown field {unknown[0]!r}; its fields: {', '.join(ALIAS_FIELDS)}"
            )
        try:
            sha256 = entry.get("sha256") or None
            filename = entry.get("file") or None
            where = f"alias {name!r}"
            prompts = check_prompts(entry.get("prompts", {}), entry.get("default_prompt_name"), where)
            prompts = check_card_conventions(
                prompts, entry.get("append_eos", False), entry.get("pooling"), entry.get("normalize"), where
            )
            adapters, default_task = entry.get("adapters", []), entry.get("default_task")
            if not isinstance(adapters, list) or not all(isinstance(file, str) and file for file in adapters):
                raise InvalidInput(f"{where}: adapters must be a list of the repo's file names")
            if default_task is not None and not isinstance(default_task, str):
                raise InvalidInput(f"{where}: default_task must be a task name")
            heads_repo, heads_revision = entry.get("heads_repo"), entry.get("heads_revision", "main")
            if heads_repo is not None and not (isinstance(heads_repo, str) and heads_repo.count("/") == 1):
                raise InvalidInput(f"{where}: heads_repo must be a repo id, owner/name")
            if not isinstance(heads_revision, str) or not heads_revision:
                raise InvalidInput(f"{where}: heads_revision must be a revision (a commit hash or branch)")
            aliases[canonical_name(name)] = AliasEntry(
                entry["repo"],
                filename,
                entry["revision"],
                sha256,
                prompts,
                tuple(adapters),
                default_task,
                heads_repo,
                heads_revision,
            )
        except (KeyError, AttributeError, TypeError):
            raise InvalidConfig(f"{path}: alias {name!r} needs repo and revision") from None
        except InvalidInput as error:
            raise InvalidConfig(f"{path}: {error.message}") from None
    return aliases


def retry_delay_s(failed_attempts: int, draw: float) -> float:
    """The wait before the next attempt after `failed_attempts` (1 or more) failed in a row, for a
    `draw` in [0, 1): exponential backoff with full jitter, capped at RETRY_MAX_DELAY_S."""
    ceiling_s = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2.0 ** min(failed_attempts - 1, 32))
    return draw * ceiling_s


def quant_of(filename: str) -> str:
    """The quant a GGUF file name ends with: "Qwen3-Embedding-0.6B-Q8_0.gguf" -> "Q8_0"."""
    stem = filename.rsplit("/", 1)[-1].removesuffix(".gguf").removesuffix(".GGUF")
    last = re.split(r"[-.]", stem)[-1].upper()
    return _QUANT_ALIASES.get(last, last)


# Files beside a model in its repo that are not a model: a vision projector, and the task adapters
# llama.cpp's converter writes as lora-{task}-{model}.gguf (jina-embeddings-v3), which an alias names.
_NOT_A_MODEL = re.compile(r"mmproj|(^|/)lora-", re.IGNORECASE)


def pick_gguf_file(filenames: Sequence[str], tag: str | None, repo_id: str) -> str:
    """The GGUF file a tag means. With no tag: the first of PREFERRED_QUANTS present, or the only file."""
    candidates = [
        name
        for name in filenames
        if name.lower().endswith(".gguf") and not _SPLIT_FILE.search(name) and not _NOT_A_MODEL.search(name)
    ]
    if not candidates:
        raise UnknownModel(f"hf.co/{repo_id} has no single-file GGUF model")
    by_quant: dict[str, list[str]] = {}
    for name in sorted(candidates):
        by_quant.setdefault(quant_of(name), []).append(name)
    available = ", ".join(sorted(by_quant))
    if tag is None:
        for quant in PREFERRED_QUANTS:
            if quant in by_quant:
                return by_quant[quant][0]
        if len(candidates) == 1:
            return candidates[0]
        raise UnknownModel(f"hf.co/{repo_id} has several GGUF files; pick one with a tag: {available}")
    wanted = _QUANT_ALIASES.get(tag.upper(), tag.upper())
    if wanted not in by_quant:
        raise UnknownModel(f"hf.co/{repo_id} has no {tag} file; available: {available}")
    return by_quant[wanted][0]


class HubClient:
    def __init__(self, endpoint: str, offline: bool, aliases: dict[str, AliasEntry]) -> None:
        self._endpoint = endpoint or None
        self._offline = offline
        self.aliases = aliases

    def knows(self, name: str) -> bool:
        """Whether a name could be pulled (an alias or an hf.co/ name)."""
        return canonical_name(name) in self.aliases or parse_hub_name(name) is not None

    def check_pullable(self, name: str) -> None:
        """Fail at once, before any streaming, for a pull that cannot start."""
        if not self.knows(name):
            raise UnknownModel(
                f'model "{name}" is neither an alias in configs/models.toml nor an hf.co/{{owner}}/{{repo}} name'
            )
        if self._offline:
            raise HubUnavailable(OFFLINE_MESSAGE)

    def resolve(self, name: str) -> HubFile:
        """The exact file (commit, sha256, size) `name` means. Blocking: talks to the Hub."""
        self.check_pullable(name)
        alias = self.aliases.get(canonical_name(name))
        hub_name = parse_hub_name(name)
        if alias is not None:
            repo_id, revision, filename, tag = alias.repo_id, alias.revision, alias.filename, None
        else:
            assert hub_name is not None
            repo_id, revision, filename, tag = hub_name.repo_id, None, None, hub_name.tag
        from daemon import hub_http  # huggingface_hub: imported at the first pull, not at start-up

        with hub_http.translated_errors(repo_id, OFFLINE_MESSAGE, OFFLINE_HINT):
            info = hub_http.model_info(self._endpoint, repo_id, revision)
        siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
        filename = filename or pick_gguf_file(list(siblings), tag, repo_id)
        sibling = siblings.get(filename)
        if sibling is None:
            raise UnknownModel(f"hf.co/{repo_id} has no file {filename}")
        if sibling.lfs is None or not info.sha:
            raise DownloadFailed(f"hf.co/{repo_id}/{filename} has no sha256 on the Hub to verify it against")
        if alias and alias.sha256 and alias.sha256 != sibling.lfs.sha256:
            raise DownloadFailed(
                f"{filename}: the Hub's sha256 {sibling.lfs.sha256} differs from the pinned {alias.sha256}"
            )
        prompts = alias.prompts if alias is not None else ModelPrompts()
        adapters = []
        for adapter_name in alias.adapters if alias is not None else ():
            adapter = siblings.get(adapter_name)
            if adapter is None or adapter.lfs is None:
                raise UnknownModel(f"hf.co/{repo_id} has no adapter file {adapter_name} with a sha256 to verify")
            adapters.append(HubFile(repo_id, adapter_name, info.sha, adapter.lfs.sha256, adapter.lfs.size))
        default_task = alias.default_task if alias is not None else None
        heads = self._resolve_heads(alias.heads_repo, alias.heads_revision) if alias and alias.heads_repo else ()
        return HubFile(
            repo_id,
            filename,
            info.sha,
            sibling.lfs.sha256,
            sibling.lfs.size,
            prompts,
            tuple(adapters),
            default_task,
            heads,
        )

    def _resolve_heads(self, repo_id: str, revision: str) -> tuple[HubFile, ...]:
        """BGE-M3's two head files in `repo_id` at `revision`, each with the Hub's sha256."""
        from daemon import hub_http

        with hub_http.translated_errors(repo_id, OFFLINE_MESSAGE, OFFLINE_HINT):
            info = hub_http.model_info(self._endpoint, repo_id, revision)
        siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
        files = []
        for filename in HEAD_FILES:
            sibling = siblings.get(filename)
            if sibling is None or sibling.lfs is None or not info.sha:
                raise UnknownModel(f"hf.co/{repo_id} has no head file {filename} with a sha256 to verify")
            files.append(HubFile(repo_id, filename, info.sha, sibling.lfs.sha256, sibling.lfs.size))
        return tuple(files)

    def download(
        self,
        hub_file: HubFile,
        directory: Path,
        report: Callable[[int, int], None],
        token: CancelToken = NEVER_CANCELLED,
    ) -> Path:
        """Download into `directory`, resuming the partial file an earlier attempt left there (in this
        run, or in one that was stopped). Blocking; once `token` is cancelled it stops at the next
        chunk with the partial file kept. The bytes are not verified here: the caller hashes them."""
        if self._offline:
            raise HubUnavailable(OFFLINE_MESSAGE)
        name = Path(hub_file.filename).name
        partial, complete = directory / f"{name}.partial", directory / name
        if complete.is_file():
            return complete  # an earlier run finished the transfer but not the verification
        from daemon import hub_http

        url = hub_http.file_url(self._endpoint, hub_file.repo_id, hub_file.filename, hub_file.revision)
        with hub_http.translated_errors(hub_file.repo_id, OFFLINE_MESSAGE, OFFLINE_HINT):
            for attempt in range(1, TRANSFER_ATTEMPTS + 1):
                try:
                    hub_http.transfer(url, partial, hub_file.size_bytes, report, token)
                    break
                except hub_http.TransportError as error:
                    if attempt == TRANSFER_ATTEMPTS:
                        raise
                    delay_s = retry_delay_s(attempt, random.random())
                    log.warning("download of %s broke off (%s); resuming in %.1fs", hub_file.filename, error, delay_s)
                    token.wait(delay_s)  # a shutdown ends the wait at once
        have = partial.stat().st_size
        if have != hub_file.size_bytes:
            raise DownloadFailed(f"{hub_file.filename}: the Hub sent {have} bytes, {hub_file.size_bytes} expected")
        os.replace(partial, complete)
        return complete
