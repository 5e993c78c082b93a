"""The floor: the fastest a pyfuse3 filesystem can be on this machine.

Everything lives in Python dicts and bytearrays, and every request is answered at once, with
no I/O, no locks and no SQL. It has every kernel-caching aid wsfs can use too: the writeback
cache, long entry/attr timeouts, cached negative lookups, attributes handed out by readdirplus
(pyfuse3's `readdir_reply`), `keep_cache` on open, FLUSH answered ENOSYS (so the kernel
stops sending one at every close), and POSIX ACLs and SELinux labels answered ENOTSUP (so
`ls -l` stops asking for them at every entry). Whatever this costs over local disk is
the price of FUSE plus pyfuse3 plus trio, not of any storage design: the benchmark reports wsfs
against it so that "slow" can be split into "FUSE is slow here" and "wsfs is slow here".

It is deliberately not durable: unmount drops everything.

    python benchmarks/floorfs.py MOUNTPOINT     (foreground; `fusermount3 -u MOUNTPOINT` ends it)
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Sequence

import pyfuse3
import trio
from pyfuse3 import FUSEError

TIMEOUT = 3600.0  # seconds the kernel may trust an entry or attribute: we are the only writer
ROOT = int(pyfuse3.ROOT_INODE)


def _unsupported_xattr(name: bytes) -> bool:
    """What wsfs answers ENOTSUP for (wsfs/fs/__init__.py): POSIX ACLs, SELinux labels."""
    return name.startswith(b"system.posix_acl_") or name == b"security.selinux"


class Node:
    """One inode: attributes, plus data (files), children (directories) or a target (links)."""

    __slots__ = (
        "atime",
        "children",
        "ctime",
        "data",
        "gid",
        "ino",
        "lookups",
        "mode",
        "mtime",
        "nlink",
        "opens",
        "parent",
        "rdev",
        "seq",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, parent: int) -> None:
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.uid, self.gid, self.rdev = uid, gid, 0
        self.atime = self.mtime = self.ctime = now
        self.data = bytearray()
        self.children: dict[bytes, tuple[int, int]] = {}  # name -> (ino, readdir cookie)
        self.seq = 0  # last readdir cookie handed out in this directory
        self.target = b""
        self.parent = parent
        self.lookups = 0
        self.opens = 0
        self.xattrs: dict[bytes, bytes] = {}

    def attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(self.ino)
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = pyfuse3.ModeT(self.mode)
        a.st_nlink = self.nlink
        a.st_uid, a.st_gid, a.st_rdev = self.uid, self.gid, self.rdev
        size = len(self.target) if stat.S_ISLNK(self.mode) else len(self.data)
        a.st_size = size
        a.st_blksize = 128 * 1024
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = self.atime, self.mtime, self.ctime
        return a


class FloorFS(pyfuse3.Operations):
    """An in-memory filesystem that answers every request without waiting for anything."""

    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(self) -> None:
        super().__init__()
        root = Node(ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), ROOT)
        root.lookups = 1
        self.nodes: dict[int, Node] = {ROOT: root}
        self.next_ino = ROOT + 1

    # -- helpers ------------------------------------------------------------------------------

    def _get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return node.attr()

    def _maybe_free(self, node: Node) -> None:
        if node.nlink == 0 and node.lookups <= 0 and node.opens <= 0:
            self.nodes.pop(node.ino, None)

    def _add(self, parent: Node, name: bytes, ino: int) -> None:
        parent.seq += 1
        parent.children[name] = (ino, parent.seq)
        parent.mtime = parent.ctime = time.time_ns()

    def _new(self, parent_ino: int, name: bytes, mode: int,
             ctx: pyfuse3.RequestContext) -> Node:
        parent = self._get(parent_ino)
        if name in parent.children:
            raise FUSEError(errno.EEXIST)
        node = Node(self.next_ino, mode, ctx.uid, ctx.gid, parent_ino)
        self.next_ino += 1
        self.nodes[node.ino] = node
        self._add(parent, name, node.ino)
        if stat.S_ISDIR(mode):
            parent.nlink += 1
        return node

    # -- lookups ------------------------------------------------------------------------------

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._get(int(parent_inode))
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            return self._entry(self._get(parent.parent))
        child = parent.children.get(name)
        if child is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = pyfuse3.InodeT(0)
            neg.entry_timeout = TIMEOUT
            return neg
        return self._entry(self.nodes[child[0]])

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            node = self.nodes.get(int(ino))
            if node is not None:
                node.lookups -= n
                self._maybe_free(node)

    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._get(int(inode)).attr()

    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._get(int(inode))
        now = time.time_ns()
        if fields.update_size:
            size = attr.st_size
            if size < len(node.data):
                del node.data[size:]
            else:
                node.data.extend(bytes(size - len(node.data)))
            node.mtime = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns
        node.ctime = attr.st_ctime_ns if fields.update_ctime else now
        return node.attr()

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return self._get(int(inode)).target

    # -- names --------------------------------------------------------------------------------

    async def mknod(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: pyfuse3.ModeT, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._new(int(parent_inode), name, mode, ctx)
        node.rdev = rdev
        return self._entry(node)

    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._new(int(parent_inode), name,
                                     stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    async def symlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                      target: pyfuse3.FileNameT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._new(int(parent_inode), name, stat.S_IFLNK | 0o777, ctx)
        node.target = bytes(target)
        return self._entry(node)

    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     mode: pyfuse3.ModeT, flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(int(parent_inode), name, mode, ctx)
        node.opens += 1
        return (pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(node.ino), keep_cache=True),
                self._entry(node))

    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: pyfuse3.FileNameT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._get(int(inode))
        parent = self._get(int(new_parent_inode))
        if new_name in parent.children:
            raise FUSEError(errno.EEXIST)
        self._add(parent, new_name, node.ino)
        node.nlink += 1
        node.ctime = time.time_ns()
        return self._entry(node)

    def _remove(self, parent: Node, name: bytes, want_dir: bool) -> None:
        child = parent.children.get(name)
        if child is None:
            raise FUSEError(errno.ENOENT)
        node = self.nodes[child[0]]
        is_dir = stat.S_ISDIR(node.mode)
        if want_dir and not is_dir:
            raise FUSEError(errno.ENOTDIR)
        if not want_dir and is_dir:
            raise FUSEError(errno.EISDIR)
        if is_dir and node.children:
            raise FUSEError(errno.ENOTEMPTY)
        del parent.children[name]
        parent.mtime = parent.ctime = time.time_ns()
        if is_dir:
            parent.nlink -= 1
            node.nlink = 0
        else:
            node.nlink -= 1
        self._maybe_free(node)

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        self._remove(self._get(int(parent_inode)), name, want_dir=False)

    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        self._remove(self._get(int(parent_inode)), name, want_dir=True)

    async def rename(self, parent_inode_old: pyfuse3.InodeT, name_old: pyfuse3.FileNameT,
                     parent_inode_new: pyfuse3.InodeT, name_new: pyfuse3.FileNameT,
                     flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> None:
        old = self._get(int(parent_inode_old))
        new = self._get(int(parent_inode_new))
        src = old.children.get(name_old)
        if src is None:
            raise FUSEError(errno.ENOENT)
        dst = new.children.get(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if dst is None:
                raise FUSEError(errno.ENOENT)
            self._add(old, name_old, dst[0])
            self._add(new, name_new, src[0])
            return
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if dst[0] == src[0]:
                return
            self._remove(new, name_new, want_dir=stat.S_ISDIR(self.nodes[dst[0]].mode))
        del old.children[name_old]
        old.mtime = old.ctime = time.time_ns()
        self._add(new, name_new, src[0])
        node = self.nodes[src[0]]
        node.ctime = time.time_ns()
        if stat.S_ISDIR(node.mode) and old is not new:
            old.nlink -= 1
            new.nlink += 1
            node.parent = new.ino

    # -- data ---------------------------------------------------------------------------------

    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._get(int(inode))
        node.opens += 1
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(node.ino), keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return bytes(self.nodes[int(fh)].data[off:off + size])

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        data = self.nodes[int(fh)].data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off:off + len(buf)] = buf
        return len(buf)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        node = self.nodes.get(int(fh))
        if node is not None:
            node.opens -= 1
            self._maybe_free(node)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        raise FUSEError(errno.ENOSYS)  # as wsfs: no FLUSH at every close from now on

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        pass

    # -- directories --------------------------------------------------------------------------

    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        node = self._get(int(inode))
        if not stat.S_ISDIR(node.mode):
            raise FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(node.ino)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        nodes = self.nodes
        for name, (ino, cookie) in list(self._get(int(fh)).children.items()):
            if cookie <= start_id:
                continue
            node = nodes[ino]
            if not pyfuse3.readdir_reply(token, name, node.attr(), cookie):
                break
            node.lookups += 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 128 * 1024
        s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 38
        s.f_files = 1 << 32
        s.f_ffree = s.f_favail = (1 << 32) - len(self.nodes)
        s.f_namemax = 255
        return s

    # -- extended attributes ------------------------------------------------------------------

    # POSIX ACLs and SELinux labels are answered ENOTSUP, as wsfs does: `ls -l` remembers
    # that per filesystem and stops asking for them (with ENODATA, two requests per entry).

    async def setxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if _unsupported_xattr(name):
            raise FUSEError(errno.ENOTSUP)
        self._get(int(inode)).xattrs[bytes(name)] = bytes(value)

    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        value = self._get(int(inode)).xattrs.get(bytes(name))
        if value is None:
            raise FUSEError(errno.ENOTSUP if _unsupported_xattr(name) else pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: pyfuse3.InodeT,
                        ctx: pyfuse3.RequestContext) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(n) for n in self._get(int(inode)).xattrs]

    async def removexattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                          ctx: pyfuse3.RequestContext) -> None:
        if self._get(int(inode)).xattrs.pop(bytes(name), None) is None:
            raise FUSEError(pyfuse3.ENOATTR)

    async def access(self, inode: pyfuse3.InodeT, mode: pyfuse3.ModeT,
                     ctx: pyfuse3.RequestContext) -> bool:
        return True


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    pyfuse3.init(FloorFS(), sys.argv[1], {"fsname=floorfs", "subtype=floorfs",
                                          "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
