"""The metadata schema: the one canonical description of what `meta.db` holds.

The database is the filesystem's metadata, and a checkpoint of it is what the store publishes.
Every column is described here and nowhere else.

inodes      one row per inode, the root is inode 1 (pyfuse3.ROOT_INODE)
  id          inode number; never reused while the workspace exists (AUTOINCREMENT)
  mode        st_mode: file type bits and permission bits
  uid, gid    owner
  size        st_size in bytes (for a symlink: the length of its target)
  nlink       number of directory entries naming it; a directory counts "." and its parent's
              entry and one ".." per subdirectory, i.e. 2 + subdirectories. An inode with nlink 0
              is an unlinked file still open; it is deleted at its last release/forget, or at the
              next mount if the daemon died first.
  rdev        device number for character/block special files, else 0
  atime_sec, atime_nsec, mtime_sec, mtime_nsec, ctime_sec, ctime_nsec
              timestamps (timestamps are data: tar and pip set them) as a timespec: seconds since
              the epoch, negative before 1970, and nanoseconds 0-999,999,999 past them. Any time
              the kernel hands over is kept exactly (it has 64-bit seconds): nanoseconds since
              the epoch in one integer end in 1677 and 2262 (format 3 had those, as atime_ns,
              mtime_ns, ctime_ns). An upgraded database has these columns after `target`.
  target      symlink target bytes, NULL for every other type

dentries    directory entries
  id          readdir cookie: entries are listed in id order, so a listing resumed at a cookie
              never repeats or skips an entry that stayed put (AUTOINCREMENT: ids never reused).
              Index dentries_by_parent is (parent, id): a resumed listing of a huge directory
              seeks to its cookie instead of sorting the whole directory again (50 ms -> 0.1 ms
              per readdir request in a 100k-entry directory).
  parent      directory inode
  name        entry name (bytes, never "." or "..")
  inode       the inode it names

xattrs      extended attributes: (inode, name) → value, names as bytes including the namespace

blocks      the block map: file data, one row per non-hole block
  inode, idx  the file and the block index (offset // block_size); a missing row is a hole
  id          block id: the name of the local dirty file while dirty, and of the immutable object
              data/<id[:2]>/<id> in the store once uploaded on its own; a new id for every new
              content
  csum        sha256 hex of the uploaded content, NULL while the block has never been uploaded
              (a checkpoint never holds a NULL: the sync layer fills it in before publishing).
              Index blocks_to_upload: the blocks awaiting upload (NULL csum), by id, for
              the sync layer's bookkeeping. Nothing else looks a block up by id, and an
              index of every block by its random id made each flush touch pages all over
              the database (each checkpoint re-uploaded most of it).
  pack        the id of the pack object (blocks/pack.py, stored as data/<pack[:2]>/<pack>)
              holding the block, NULL when the block is an object of its own; set together
              with csum. Index blocks_by_pack: dropping a packed block asks whether any other
              block still keeps its pack.

garbage     objects in the store that the tree no longer references (single blocks, and packs
            none of whose blocks is referenced), each with the run of checkpoints that may
            name it; deleted from the store once no kept checkpoint is in that run
            (meta/retention.py `may_delete`). A checkpoint carries the rows, so a mount from
            it on another machine goes on collecting them.
  id          object id (a block id or a pack id)
  born        the first checkpoint that may name it (from its `objects` row); NULL: unknown,
              which counts as the first checkpoint there is
  died        the last checkpoint that may name it: set to the number before the first
              published checkpoint whose snapshot holds the row; NULL until then

objects     every data object the block map names (a single block, or a pack) uploaded since
            format 5, with `born`: the number after the newest published checkpoint at its
            upload (or its repack switch), a lower bound of the first checkpoint that names
            it. Moved into `garbage` when the object leaves the tree. An object without a row
            (uploaded by an older version) counts as born with the first checkpoint.
  id          object id
  born        checkpoint number

packs       the size of each pack object that blocks may live in, so the repacker (repack.py)
            can tell how much of a pack is dead: the pack's live bytes are its members' in the
            block map, estimated from their files' sizes. A row goes with its pack (into garbage).
  id          the pack id (blocks.pack)
  size        the bytes of block data the pack was uploaded with; NULL when unknown (packs
            uploaded before format 3: the repacker asks the store for the object's size).
            A checkpoint lacks the rows of the packs of its own flush cycle (written after
            its snapshot was pinned); those packs have lost nothing since (a loss is a change,
            and a later checkpoint would hold the rows), so the mount gives them rows before
            it serves (meta/packs.py adopt_packs).

settings    key/value facts about this database (format version, the checkpoint it came from)
"""

import sqlite3

FORMAT_VERSION = 5  # 2: blocks.pack; 3: packs; 4: timestamps as seconds and nanoseconds;
# 5: objects, garbage.born/died (retention)

ROOT = 1  # the root directory's inode (the kernel's FUSE_ROOT_ID)
# The workspace marker, a read-only file in the root: a workspace without it cannot start, so
# the filesystem refuses its removal (fs/) and every new workspace is created with it.
MARKER = b".workspace.initialized"

SCHEMA = """
CREATE TABLE inodes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    mode       INTEGER NOT NULL,
    uid        INTEGER NOT NULL,
    gid        INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    nlink      INTEGER NOT NULL,
    rdev       INTEGER NOT NULL DEFAULT 0,
    atime_sec  INTEGER NOT NULL,
    atime_nsec INTEGER NOT NULL,
    mtime_sec  INTEGER NOT NULL,
    mtime_nsec INTEGER NOT NULL,
    ctime_sec  INTEGER NOT NULL,
    ctime_nsec INTEGER NOT NULL,
    target     BLOB
);
CREATE TABLE dentries (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    inode  INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_inode ON dentries (inode);
CREATE INDEX dentries_by_parent ON dentries (parent);
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
CREATE TABLE blocks (
    inode INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    id    TEXT NOT NULL,
    csum  TEXT,
    pack  TEXT,
    PRIMARY KEY (inode, idx)
) WITHOUT ROWID;
CREATE INDEX blocks_to_upload ON blocks (id) WHERE csum IS NULL;
CREATE INDEX blocks_by_pack ON blocks (pack);
CREATE TABLE garbage (
    id   TEXT PRIMARY KEY,
    born INTEGER,
    died INTEGER
) WITHOUT ROWID;
CREATE TABLE objects (
    id   TEXT PRIMARY KEY,
    born INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE packs (
    id   TEXT PRIMARY KEY,
    size INTEGER
) WITHOUT ROWID;
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


def create_schema(conn: sqlite3.Connection) -> None:
    """Create every table of an empty database and record the format version."""
    conn.executescript(SCHEMA)
    conn.execute(
        "INSERT INTO settings (key, value) VALUES ('format', ?)", (str(FORMAT_VERSION),)
    )


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring a database of an older format up to FORMAT_VERSION, in place and idempotently.

    Format 1 had no packs: every block was an object of its own, which is what a NULL pack
    means, so adding the column is the whole upgrade to 2. Format 2 had no `packs` table:
    every pack in use gets a row of unknown size (the repacker asks the store). Format 3 kept
    each timestamp as nanoseconds in one column: split into seconds and nanoseconds. Format 4
    had no `objects` table and no runs in `garbage`: its objects are of unknown birth (NULL,
    the first checkpoint), and its garbage rows die with the next checkpoint.
    """
    # An index, not a format: blocks_by_id indexed every block by its random id, so each
    # flush cycle's inserts touched pages all over the database, and each checkpoint
    # re-uploaded ~80% of it. Only blocks awaiting upload are ever looked up by id.
    conn.execute("DROP INDEX IF EXISTS blocks_by_id")
    conn.execute("CREATE INDEX IF NOT EXISTS blocks_to_upload ON blocks (id) WHERE csum IS NULL")
    row = conn.execute("SELECT value FROM settings WHERE key='format'").fetchone()
    fmt = int(row[0]) if row else 0
    if fmt == 1:
        # Each statement commits by itself (the connection is in autocommit here): a crash
        # between them must leave a database this can still upgrade.
        if "pack" not in {r[1] for r in conn.execute("PRAGMA table_info(blocks)")}:
            conn.execute("ALTER TABLE blocks ADD COLUMN pack TEXT")
        conn.execute("CREATE INDEX IF NOT EXISTS blocks_by_pack ON blocks (pack)")
    if fmt in (1, 2):
        conn.execute("CREATE TABLE IF NOT EXISTS packs (id TEXT PRIMARY KEY, size INTEGER)"
                     " WITHOUT ROWID")
        conn.execute("INSERT OR IGNORE INTO packs (id) SELECT DISTINCT pack FROM blocks"
                     " WHERE pack IS NOT NULL")
        conn.execute("UPDATE settings SET value='3' WHERE key='format'")
        conn.commit()
    if fmt in (1, 2, 3):
        _split_times(conn)
    if fmt in (1, 2, 3, 4):
        # Each statement commits by itself, and each is skipped once done: a crash between
        # them leaves a database this can still upgrade.
        columns = {r[1] for r in conn.execute("PRAGMA table_info(garbage)")}
        for column in ("born", "died"):
            if column not in columns:
                conn.execute(f"ALTER TABLE garbage ADD COLUMN {column} INTEGER")
        conn.execute("CREATE TABLE IF NOT EXISTS objects (id TEXT PRIMARY KEY,"
                     " born INTEGER NOT NULL) WITHOUT ROWID")
        conn.execute("UPDATE settings SET value='5' WHERE key='format'")
        conn.commit()


TIMES = ("atime", "mtime", "ctime")  # the timestamps of an inode, each two columns


def _split_times(conn: sqlite3.Connection) -> None:
    """Format 3 to 4: each `X_ns` column becomes `X_sec` and `X_nsec`, in one transaction (a
    crash leaves format 3 whole). SQLite's `/` and `%` round towards zero: a time before 1970
    takes the second below it, and the nanoseconds past that (never a subtraction, which
    could leave 64 bits and turn into an inexact float)."""
    if conn.in_transaction:
        conn.commit()
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(inodes)")}
        if "atime_ns" in columns:  # (tests make older formats out of newer databases)
            for t in TIMES:
                for unit in ("sec", "nsec"):
                    conn.execute(f"ALTER TABLE inodes ADD COLUMN {t}_{unit} INTEGER NOT NULL"
                                 " DEFAULT 0")
            conn.execute("UPDATE inodes SET " + ", ".join(
                f"{t}_sec = {t}_ns / 1000000000 - ({t}_ns % 1000000000 < 0),"
                f" {t}_nsec = {t}_ns % 1000000000 + 1000000000 * ({t}_ns % 1000000000 < 0)"
                for t in TIMES))
            for t in TIMES:
                conn.execute(f"ALTER TABLE inodes DROP COLUMN {t}_ns")
        conn.execute("UPDATE settings SET value='4' WHERE key='format'")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def referenced_objects(conn: sqlite3.Connection) -> set[str]:
    """The ids of every store object a database references: single blocks and packs."""
    return {str(r[0]) for r in conn.execute(
        "SELECT id FROM blocks WHERE pack IS NULL"
        " UNION SELECT pack FROM blocks WHERE pack IS NOT NULL")}
