"""Blocks: dirty and clean block storage and block transfer; blind to inodes and paths."""

from .cache import BlockCache
from .clean import BlockCorrupt
from .files import checksum, object_key

__all__ = ["BlockCache", "BlockCorrupt", "checksum", "object_key"]
