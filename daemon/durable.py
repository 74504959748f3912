"""What makes a rename survive a power cut: the directory that holds the new name, synced.

The store (models and blobs) and the batch database (uploads and output files) write a file whole,
fsync it, rename it into place, then sync its directory, so a crash leaves the old name or the new
one, never a name without its content.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
