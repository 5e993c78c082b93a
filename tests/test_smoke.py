"""The shortest end-to-end proof: write through a mount, read it back on a fresh machine."""

import pytest
from conftest import Workspace

pytestmark = pytest.mark.smoke


def test_write_unmount_remount_on_empty_cache(any_ws: Workspace) -> None:
    mnt = any_ws.mount()
    (mnt / "hello.txt").write_text("hello, workspace\n")
    (mnt / "dir").mkdir()
    (mnt / "dir" / "big.bin").write_bytes(bytes(range(256)) * 20000)
    mnt = any_ws.remount(wipe_cache=True)
    assert (mnt / "hello.txt").read_text() == "hello, workspace\n"
    assert (mnt / "dir" / "big.bin").read_bytes() == bytes(range(256)) * 20000
    assert (mnt / ".workspace.initialized").exists()
    any_ws.unmount()
