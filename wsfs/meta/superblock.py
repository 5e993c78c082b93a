"""The superblock `wsfs.json`: which format wrote a workspace, its id and its block size.

It is the first object a mount reads and the last one `wsfs init` writes: a store without it
holds no workspace (the checkpoint it would name may be half written).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import FormatError, NoWorkspaceError
from ..store import NoSuchKey, ObjectStore

SUPERBLOCK_KEY = "wsfs.json"
FORMAT = 1
DEFAULT_BLOCK_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Superblock:
    format: int
    workspace_id: str
    block_size: int
    created_ns: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()


def read_superblock(store: ObjectStore) -> Superblock:
    """The workspace's superblock, or a clear error if there is none or it is too new."""
    try:
        data = json.loads(store.get(SUPERBLOCK_KEY))
    except NoSuchKey:
        raise NoWorkspaceError(
            f"{store.url} holds no wsfs workspace; create one with `wsfs init {store.url}` "
            "or mount with --init"
        ) from None
    except ValueError:
        raise NoWorkspaceError(
            f"the superblock {SUPERBLOCK_KEY} in {store.url} is unreadable; restore it or "
            "point wsfs at the right store"
        ) from None
    if int(data.get("format", 0)) > FORMAT:
        raise FormatError(
            f"{store.url} was written by a newer wsfs (format {data['format']}, this wsfs "
            f"reads format {FORMAT}); upgrade wsfs"
        )
    return Superblock(int(data["format"]), str(data["workspace_id"]), int(data["block_size"]),
                      int(data["created_ns"]))
