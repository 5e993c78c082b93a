"""Metadata: the SQLite schema, typed access to it, and its checkpoints in the store."""

from .blockmap import BlockRef
from .db import Inode, Metadata

__all__ = ["BlockRef", "Inode", "Metadata"]
