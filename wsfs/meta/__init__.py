"""Metadata: the SQLite schema, typed access to it, and its checkpoints in the store."""

from .db import BlockRef, Inode, Metadata

__all__ = ["BlockRef", "Inode", "Metadata"]
