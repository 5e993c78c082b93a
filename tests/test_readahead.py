"""The kernel reads a mount ahead by whole blocks, not by its default 128 KiB."""

import hashlib
import os
from pathlib import Path

import pytest
from conftest import Workspace, wait_for

from wsfs.daemon.readahead import mount_device
from wsfs.meta.superblock import DEFAULT_BLOCK_SIZE
from wsfs.runtime import parse_mountinfo

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
97 22 0:39 / /tmp/with\\040space rw,nosuid,nodev shared:50 - fuse.wsfs s3://b/ws rw
98 22 0:40 / /tmp/m rw shared:51 - fuse.wsfs s3://b/a rw
99 98 0:41 / /tmp/m rw shared:52 - fuse.wsfs s3://b/b rw
"""


@pytest.mark.layers
def test_mount_device_reads_escaped_paths_and_the_newest_mount() -> None:
    assert mount_device("/tmp/with space", MOUNTINFO) == "0:39"
    assert mount_device("/tmp/m", MOUNTINFO) == "0:41"  # mounted over the one before
    assert mount_device("/tmp/none", MOUNTINFO) is None
    spaced = parse_mountinfo(MOUNTINFO)[1]
    assert (spaced.mountpoint, spaced.fstype, spaced.source) == (
        Path("/tmp/with space"), "fuse.wsfs", "s3://b/ws")
    assert spaced.options == {"rw", "nosuid", "nodev"} and spaced.super_options == {"rw"}


def test_a_mount_reads_ahead_a_block_and_reads_back_every_byte(ws: Workspace) -> None:
    mnt = ws.mount()
    dev = os.stat(mnt).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    wait_for("the readahead of a block",  # set by the daemon just after the kernel's INIT
             lambda: int(knob.read_text()) == DEFAULT_BLOCK_SIZE // 1024, timeout=10)
    data = os.urandom(5 * DEFAULT_BLOCK_SIZE + 12345)  # ends inside a block
    (mnt / "big.bin").write_bytes(data)
    mnt = ws.remount(wipe_cache=True)
    digest = hashlib.sha256()
    with open(mnt / "big.bin", "rb", buffering=0) as f:
        while chunk := f.read(3 * 65536 + 7):  # reads that straddle the blocks' edges
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    ws.unmount()
