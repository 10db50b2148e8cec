"""Where a release keeps its checkpoints: a file system, or object storage through the Multi-Storage Client
(``msc://``). The layout read and the inspector open a checkpoint's files where the release would; nothing here
imports torch or megatron-core.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

MSC_SCHEME = "msc"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageUnavailable(Exception):
    """The checkpoint's storage cannot be read from here; the message says why, in one line."""


def scheme_of(location: str) -> str | None:
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


def unknown_scheme(location: str) -> str | None:
    """Why the package cannot judge where ``location`` is, or None when it can: a local path, or ``msc://``."""
    scheme = scheme_of(location)
    if scheme in (None, MSC_SCHEME):
        return None
    return f"its {scheme}:// scheme is not one bridge_rng_patch reads (file system paths and msc://)"


def checkpoint_path(location: str) -> Any:
    """A path object for ``location`` with pathlib's methods: ``pathlib.Path``, or the Multi-Storage Client's."""
    scheme = scheme_of(location)
    if scheme is None:
        return Path(location)
    if scheme != MSC_SCHEME:
        raise StorageUnavailable(f"{location}: {unknown_scheme(location)}")
    multistorageclient = _multistorageclient(location)
    try:
        return multistorageclient.Path(location)
    except Exception as error:  # the client's configuration errors: no MSC_CONFIG, an unknown profile, ...
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}".rstrip(": ")
        hint = "" if os.environ.get("MSC_CONFIG") else "; MSC_CONFIG, the file of its profiles, is not set"
        raise StorageUnavailable(f"{location}: the Multi-Storage Client cannot resolve it ({why}){hint}") from None


def dcp_metadata_reader(location: str) -> Any:
    if scheme_of(location) == MSC_SCHEME:
        return _multistorageclient(location).torch.MultiStorageFileSystemReader(location)
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(location)


def _multistorageclient(location: str) -> Any:
    try:
        import multistorageclient
    except ImportError:
        raise StorageUnavailable(
            f"{location}: msc:// paths are read with the multi-storage-client package, which is not installed here"
        ) from None
    return multistorageclient
