"""Packs: many blocks in one store object.

A workspace is mostly small files (a package tree averages ~10 KiB per file), and one object
per block makes every flush a storm of PUTs whose per-request cost, not bandwidth, bounds it:
on two cores boto3 plus the server spend milliseconds of CPU per request, taken from the
thread that answers the kernel. The blocks sealed by one flush cycle are therefore uploaded
together, as packs of up to PACK_TARGET bytes, and a cold read of one of them fetches the
whole pack: files written together are read together (a package is installed at once and
imported at once), so one GET serves a whole directory tree, and a big file written
sequentially comes back 4 MiB per request instead of 1 MiB.

A pack is self-describing, so the block layer can split it without asking the metadata:

    MAGIC | u32 header length | header (JSON: [[block id, length, sha256 hex], ...]) | data

with the members' contents concatenated in header order. The block map records which pack
holds a block (meta/schema.py); the object's name comes from the pack's own random id, like a
block's, so packs and single blocks share one namespace and one garbage list.

A pack is written once and never changed. Its dead members (files deleted or rewritten since)
are reclaimed by repacking (wsfs/sync/repack.py): the survivors of a mostly dead pack are copied
into a new pack under a new id, and the old pack becomes garbage.
"""

from __future__ import annotations

import hashlib
import json
import struct

MAGIC = b"WSFSPACK1\n"
PACK_TARGET = 4 << 20  # a pack is closed before it grows past this
PACK_MEMBER_MAX = 1 << 20  # bigger blocks are uploaded as objects of their own
_LENGTH = struct.Struct(">I")


class PackCorrupt(Exception):
    """An object that should be a pack cannot be read as one."""


def group(sizes: dict[str, int]) -> tuple[list[list[str]], list[str]]:
    """Split blocks (id -> length) into packs and a list of blocks uploaded on their own.

    Packs keep the order the blocks came in (creation order: files written together stay
    together), and a lone block is uploaded on its own: a pack of one buys nothing.
    """
    packs: list[list[str]] = []
    singles: list[str] = []
    current: list[str] = []
    filled = 0
    for block_id, size in sizes.items():
        if size > PACK_MEMBER_MAX:
            singles.append(block_id)
            continue
        if current and filled + size > PACK_TARGET:
            packs.append(current)
            current, filled = [], 0
        current.append(block_id)
        filled += size
    if current:
        packs.append(current)
    singles.extend(p[0] for p in packs if len(p) == 1)
    return [p for p in packs if len(p) > 1], singles


def build(members: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    """The object holding `members` (id, content), and each member's checksum."""
    csums = {block_id: hashlib.sha256(data).hexdigest() for block_id, data in members}
    header = json.dumps(
        [[block_id, len(data), csums[block_id]] for block_id, data in members],
        separators=(",", ":"),
    ).encode()
    parts = [MAGIC, _LENGTH.pack(len(header)), header]
    parts.extend(data for _, data in members)
    return b"".join(parts), csums


def split(blob: bytes) -> dict[str, tuple[str, bytes]]:
    """Every member of a pack whose content matches the checksum the pack records for it,
    as id -> (checksum, content).

    A member that does not match is left out: whoever asked for it sees it as missing. The
    checksums are returned so callers compare them with the block map's instead of hashing
    every member twice.
    """
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _LENGTH.size:
        raise PackCorrupt("not a pack")
    start = len(MAGIC) + _LENGTH.size
    (header_len,) = _LENGTH.unpack_from(blob, len(MAGIC))
    try:
        header = json.loads(blob[start : start + header_len])
    except ValueError:
        raise PackCorrupt("the pack's header is damaged") from None
    out = {}
    pos = start + header_len
    view = memoryview(blob)
    for block_id, length, csum in header:
        data = bytes(view[pos : pos + length])
        pos += length
        if len(data) == length and hashlib.sha256(data).hexdigest() == csum:
            out[str(block_id)] = (str(csum), data)
    return out
