"""Reading the pickles the inspector needs (torch zip archives: a common state, an RNG entry) without running pickled
code or reading more than a bound: ``argparse.Namespace`` is built for real, every other class named becomes a
placeholder, tensor storages None; a real common state's pickle is 17 KB, and a crafted one must not inflate to GBs.
"""

from __future__ import annotations

import argparse
import functools
import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

READ_LIMIT = 16 * 2**20


class CheckpointInputError(ValueError):
    """The path given is not something the inspector can read; the message says what it is and why."""


class _Unpickled:
    """What a class or function named in a pickle becomes here: a placeholder that keeps what it was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@functools.cache
def _placeholder_class(module: str, name: str) -> type:
    """One class per name: a pickle may name a class once per object, in a few bytes each time."""
    return type(name, (_Unpickled,), {"__module__": f"unpickled.{module}"})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> None:
        return None


def unpickled(data: bytes) -> Any:
    return _Unpickler(io.BytesIO(data)).load()


def bounded_read(where: Path, stream: Any, size: int, what: str) -> bytes:
    """The ``size`` bytes of ``stream``; CheckpointInputError, nothing read, where they exceed ``READ_LIMIT``."""
    if size > READ_LIMIT:
        raise CheckpointInputError(
            f"{where}: its {what} holds {size:,} bytes, more than the {READ_LIMIT >> 20} MiB this inspector "
            "reads for the run's args (a real one holds kilobytes), so it was not read"
        )
    return stream.read(size)


def item_storage(metadata: Path, data: bytes, matches: Callable[[str], bool], what: str) -> dict[str, Any]:
    """Where ``.metadata`` (its bytes ``data``) places the item whose key ``matches``: relative_path, offset, length."""
    try:
        storage_data = unpickled(data).state["storage_data"]
        return next(info.state for index, info in storage_data.items() if matches(index.state["fqn"]))
    except Exception as error:  # a cut or foreign file: pickle, attribute and lookup errors alike
        raise CheckpointInputError(f"{metadata}: no readable {what} in it ({type(error).__name__})") from None


def pickle_in_archive(where: Path, archive_file: Any, what: str) -> Any:
    """What a torch zip archive's pickle holds; zipfile inflates no more than its header states."""
    try:
        with zipfile.ZipFile(archive_file) as archive:
            pickled = next(info for info in archive.infolist() if info.filename.endswith("/data.pkl"))
            with archive.open(pickled) as member:
                return unpickled(
                    bounded_read(where, member, pickled.file_size, f"pickle {pickled.filename}, inflated,")
                )
    except CheckpointInputError:
        raise
    except Exception as error:  # a cut or foreign file: zipfile, pickle and StopIteration errors alike
        raise CheckpointInputError(f"{where}: not a readable {what} ({type(error).__name__})") from None


def archive_item(directory: Path, metadata: Path, data: bytes, matches: Callable[[str], bool], what: str) -> Any:
    """What the pickle of a torch archive stored as a DCP item holds, where ``.metadata`` places it."""
    where = item_storage(metadata, data, matches, what)
    with (directory / where["relative_path"]).open("rb") as storage:
        storage.seek(where["offset"])
        return pickle_in_archive(metadata, io.BytesIO(bounded_read(metadata, storage, where["length"], what)), what)
