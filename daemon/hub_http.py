"""The Hub's HTTP, through huggingface_hub: imported at the first pull (see daemon.hub).

It imports nothing of daemon.hub (which imports it): the words its errors end with are handed in.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._headers import build_hf_headers
from huggingface_hub.utils._http import get_session, hf_raise_for_status

from daemon.errors import DownloadFailed, HubUnavailable, InsufficientDisk, UnknownModel
from daemon.jobs import CancelToken

TransportError = httpx2.TransportError
# Bytes read between two cancellation checks and progress reports.
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# A stalled transfer fails after this long without a byte (and is resumed by the next attempt).
READ_TIMEOUT_S = 10.0


def model_info(endpoint: str | None, repo_id: str, revision: str | None) -> Any:
    return HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)


def file_url(endpoint: str | None, repo_id: str, filename: str, revision: str) -> str:
    return str(hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint))


def transfer(url: str, partial: Path, size_bytes: int, report: Callable[[int, int], None], token: CancelToken) -> None:
    """GET the bytes `partial` lacks (a Range request when it has some) and append them."""
    start = partial.stat().st_size if partial.exists() else 0
    if start >= size_bytes > 0:
        return
    headers = build_hf_headers()  # HF_TOKEN, for gated repos; dropped on the redirect to the CDN
    if start:
        headers["Range"] = f"bytes={start}-"
    timeout = httpx2.Timeout(READ_TIMEOUT_S, connect=READ_TIMEOUT_S)
    with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
        hf_raise_for_status(response)
        if response.status_code != 206:
            start = 0  # the server sent the whole file: start over
        with partial.open("r+b" if start else "wb") as file:
            file.seek(start)
            done = start
            report(done, size_bytes)
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                if done + len(chunk) > size_bytes:
                    # Never more than the Hub said the file holds: a server that keeps sending
                    # would fill the disk. What fits is kept; the sha256 check judges it.
                    file.write(chunk[: size_bytes - done])
                    raise DownloadFailed(f"{partial.name}: the Hub sent more than the {size_bytes} bytes expected")
                file.write(chunk)
                done += len(chunk)
                report(done, size_bytes)
                token.check()  # after the write: what arrived is kept for the next attempt
            file.flush()
            os.fsync(file.fileno())


@contextlib.contextmanager
def translated_errors(repo_id: str, offline_message: str, offline_hint: str) -> Iterator[None]:
    """huggingface_hub's exceptions as the daemon's domain errors, each with a message to act on:
    `offline_message` for huggingface_hub's offline mode, and a Hub out of reach ends with
    `offline_hint` (what to do without the Hub)."""
    repo = f"hf.co/{repo_id}"
    try:
        yield
    except GatedRepoError:
        raise UnknownModel(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UnknownModel(f"{repo}: revision not found") from None
    except EntryNotFoundError:
        raise UnknownModel(f"{repo}: file not found") from None
    except RepositoryNotFoundError:
        raise UnknownModel(f"{repo} not found on the Hugging Face Hub (or private: set HF_TOKEN)") from None
    except OfflineModeIsEnabled:
        raise HubUnavailable(offline_message) from None
    except HfHubHTTPError as error:
        raise DownloadFailed(f"{repo}: the Hub answered {error}") from None
    except Exception as error:
        # Connection failures surface as huggingface_hub's HTTP library's own exception types.
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:  # our disk, not the Hub
            raise InsufficientDisk(f"no space left on device while downloading from {repo}") from None
        if type(error).__name__ in ("ConnectError", "ConnectTimeout") or isinstance(error, ConnectionError):
            raise HubUnavailable(f"cannot reach the Hugging Face Hub ({error}); {offline_hint}") from None
        if isinstance(error, OSError | ValueError) or type(error).__module__.startswith("httpx"):
            raise DownloadFailed(f"{repo}: download failed: {error}") from None
        raise
