"""Blocks: dirty and clean block storage and block transfer; blind to inodes and paths."""

from .cache import BlockCache, BlockCorrupt, checksum, object_key

__all__ = ["BlockCache", "BlockCorrupt", "checksum", "object_key"]
