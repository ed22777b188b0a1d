"""The staging area of a writable session: what changed since the base index, on local disk.

Layout of a session directory (see lifecycle.py for where it lives):

    session.json    who, what and where (image, index, mountpoint, pid): for listing
    staging.db      SQLite (WAL): the changed inodes, the changed directories' entries, and
                    the session's counters and base
    data/<ino>      one sparse file per regular file whose bytes changed

What is written in which order, and why a crash at any moment is safe:

- File bytes go straight into `data/<ino>` with pwrite, but for a new file while it is
  small (content.INLINE_MAX; INLINE_TOTAL for all of them): its bytes are kept in memory
  and written with its row, so untarring 10 000 small files makes no 10 000 data files.
  Which byte ranges of a data file are the truth (`staged` ranges; the rest still comes
  from the base index) is metadata.
- Metadata changes are kept in memory and written to SQLite in one transaction per
  `sync()`: at fsync/fsyncdir (then with SQLite's FULL durability, after fsyncing the data
  files), at release of a written file, before a commit, and every SYNC_INTERVAL seconds.
  One transaction holds everything changed since the last, so the database always holds
  the tree as it was at some moment: never an entry naming an inode it lacks.
- After a SIGKILL or a crash of the mount process, what the last transaction recorded is
  the session (`imagefs remount`).  Bytes written after it may sit in a data file but lie
  outside its recorded ranges or size, so they are not shown: the file reads as it was
  then, as on a filesystem that had not yet written its metadata.  Every change that was
  fsynced is in a transaction that was made durable before fsync returned.
- Copy-on-write is per chunk: a write into a base file first copies only the chunks it
  touches into the data file (staged ranges grow by whole chunks), so 4 KiB written into
  a 1 GiB file stages one chunk, never the file.

A volatile staging (a servicing transaction's own session, never resumed: a crash discards
it whole) keeps the same state in `staging.journal` instead of SQLite: each sync() appends
one record of what changed (a 4-byte length, then the marshalled change), and a load
replays them in order; a record cut short by a crash ends the journal.  Its mount writes
the session once, at its end (a listing of 714 entries and 150 changed inodes for
`package add` of hello), and its verb reads it back at once: ~8 ms into SQLite and ~5 ms
out of it, ~1.5 ms and ~0.5 ms here.  marshal is safe here because the session directory
is its creator's own (0700), as the SQLite file was.

Space is reclaimed when a session is discarded or its mount unmounted after commit (the
directory is removed), and a data file as soon as its inode has no name and no opener.
"""

from __future__ import annotations

import contextlib
import errno
import json
import marshal
import os
import sqlite3
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import CorruptImage
from imagefs.format import layout as F
from imagefs.format.files import flock_within, syncfs_path
from imagefs.format.records import Inode

from .ranges import Ranges

SYNC_INTERVAL = 0.5
MAX_FDS = 256  # data files kept open
SYNCFS_ABOVE = 64  # data files to make durable at once: above this, syncfs instead
NEW_INO_BASE = 1 << 62  # numbers of inodes created in a session; record refs stay below

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inodes(
    ino INTEGER PRIMARY KEY,   -- the number the mount serves
    base INTEGER,              -- the record it was copied from, NULL if created here
    kind INTEGER NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
    gid INTEGER NOT NULL, nlink INTEGER NOT NULL, size INTEGER NOT NULL,
    rdev INTEGER NOT NULL, mtime INTEGER NOT NULL, atime INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    target BLOB,               -- symlink target
    xattrs BLOB,               -- NULL: the base's; else JSON [[name hex, value hex]...]
    staged BLOB,               -- files: packed (start, end) u64 pairs; NULL: none
    base_limit INTEGER NOT NULL, -- files: base bytes show below this offset only
    listed INTEGER NOT NULL,   -- directories: 1 when `entries` holds its listing
    parent INTEGER NOT NULL,   -- the directory it was reached through (0: unknown)
    dirty INTEGER NOT NULL,    -- changed since the last commit
    committed INTEGER NOT NULL, -- the record the last commit wrote for it (0: none)
    inline BLOB                -- a small new file's bytes, kept here instead of data/<ino>
);
CREATE TABLE IF NOT EXISTS entries(
    dir INTEGER NOT NULL, name BLOB NOT NULL, child INTEGER NOT NULL,
    PRIMARY KEY(dir, name)) WITHOUT ROWID;
"""


@dataclass(slots=True, eq=False)
class StagedInode:
    """An inode the session created or changed: its attributes, and what replaces the base's
    content.  One row of `inodes` (INODE_COLUMNS).

    The attributes are records.Inode's, under the same names and flat, because the mount
    reads them (getattr, lookup) from whichever of the two an inode is; `from_record` and
    `to_record` are the one conversion each way between them."""

    ino: int
    base: int | None
    kind: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    target: bytes = b""
    xattrs: list[tuple[bytes, bytes]] | None = None  # None: the base's, unchanged
    staged: Ranges | None = None  # files: ranges whose bytes are the data file's
    base_limit: int = 0
    entries: dict[bytes, int] | None = None  # directories: name -> ino, once listed here
    parent: int = 0
    dirty: bool = True
    committed: int = 0
    inline: bytearray | None = None  # a small new file's bytes (len == size)

    @property
    def is_new(self) -> bool:
        return self.base is None

    @classmethod
    def from_record(cls, ino: int, rec: Inode, parent: int) -> StagedInode:
        """Base inode ino at its first change: its record's attributes, never its content
        (a file's bytes keep coming from the base, below base_limit)."""
        return cls(ino, rec.ref, rec.kind, rec.mode, rec.uid, rec.gid, rec.nlink, rec.size,
                   rec.rdev, rec.mtime_ns, rec.atime_ns, rec.ctime_ns, target=rec.target,
                   base_limit=rec.size if rec.kind == F.REG else 0, parent=parent,
                   dirty=False)

    def to_record(self, xattrs: list[tuple[bytes, bytes]]) -> Inode:
        """The record of the inode as it now is, but for its content (extents, entries and
        digest are the writer's).  xattrs: its extended attributes as the session reads
        them (the base's while the session never changed them)."""
        return Inode(self.kind, self.mode, self.uid, self.gid, self.nlink,
                     self.size if self.kind in (F.REG, F.LNK) else 0,
                     self.rdev if self.kind in (F.CHR, F.BLK) else 0, self.mtime_ns,
                     self.atime_ns, self.ctime_ns, xattrs=list(xattrs),
                     target=self.target if self.kind == F.LNK else b"")


# The columns of `inodes`: the reader (_from_row) goes by these names, never by position;
# the writer (_row) gives them in this order, which its statement names column by column
# (tests/test_staging_rows.py round-trips every field).
INODE_COLUMNS = ("ino", "base", "kind", "mode", "uid", "gid", "nlink", "size", "rdev",
                 "mtime", "atime", "ctime", "target", "xattrs", "staged", "base_limit",
                 "listed", "parent", "dirty", "committed", "inline")
_SELECT_INODES = f"SELECT {', '.join(INODE_COLUMNS)} FROM inodes"
_UPSERT_INODE = (f"INSERT OR REPLACE INTO inodes ({', '.join(INODE_COLUMNS)}) "
                 f"VALUES ({', '.join('?' for _c in INODE_COLUMNS)})")


def _row(n: StagedInode) -> tuple[object, ...]:
    """n as a row of `inodes`, in INODE_COLUMNS order (the order the statement names the
    columns in; a tuple, not a dict: binding by name costs a commit of 10 000 files 20%)."""
    return (
        n.ino, n.base, n.kind, n.mode, n.uid, n.gid, n.nlink, n.size, n.rdev,
        n.mtime_ns, n.atime_ns, n.ctime_ns,
        n.target if n.kind == F.LNK else None,
        _encode_xattrs(n.xattrs),
        n.staged.encode() if n.staged is not None else None,
        n.base_limit, int(n.entries is not None), n.parent, int(n.dirty), n.committed,
        bytes(n.inline) if n.inline is not None else None,
    )


def _from_row(row: sqlite3.Row | Mapping[str, Any]) -> StagedInode:
    """The StagedInode a row of `inodes` holds (its entries are loaded apart)."""
    staged, inline = row["staged"], row["inline"]
    return StagedInode(
        ino=row["ino"], base=row["base"], kind=row["kind"], mode=row["mode"], uid=row["uid"],
        gid=row["gid"], nlink=row["nlink"], size=row["size"], rdev=row["rdev"],
        mtime_ns=row["mtime"], atime_ns=row["atime"], ctime_ns=row["ctime"],
        target=row["target"] or b"", xattrs=_decode_xattrs(row["xattrs"]),
        staged=Ranges.decode(staged) if staged is not None else None,
        base_limit=row["base_limit"], entries={} if row["listed"] else None,
        parent=row["parent"], dirty=bool(row["dirty"]), committed=row["committed"],
        inline=bytearray(inline) if inline is not None else None)


def _encode_xattrs(xattrs: list[tuple[bytes, bytes]] | None) -> str | None:
    if xattrs is None:
        return None
    return json.dumps([[n.hex(), v.hex()] for n, v in xattrs])


def _decode_xattrs(text: str | None) -> list[tuple[bytes, bytes]] | None:
    if text is None:
        return None
    return [(bytes.fromhex(n), bytes.fromhex(v)) for n, v in json.loads(text)]


@dataclass
class SyncBatch:
    """What one sync() writes: inodes gone (with their entries), inodes as they now are
    (rows of `inodes`), entries set ((dir, name, child); child None: removed), and meta
    values (JSON text)."""

    gone: list[int] = field(default_factory=list)
    rows: list[tuple[object, ...]] = field(default_factory=list)
    entries: list[tuple[int, bytes, int | None]] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


class Staging:
    """The session's store: its metadata (in SQLite, or a journal when volatile) and data
    files, written as sync() says."""

    def __init__(self, directory: str, volatile: bool = False, wait: float = 0.0) -> None:
        """wait: seconds a volatile staging waits for another process to let go of it
        (JournalStore), else BlockingIOError."""
        self.dir = directory
        # volatile: a session nobody resumes after a crash (a servicing transaction's,
        # discarded whole if anything fails): nothing is fsynced, fsync returns at once.
        self.volatile = volatile
        self.data_dir = os.path.join(directory, "data")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self.store: SqliteStore | JournalStore = (JournalStore(directory, wait) if volatile
                                                  else SqliteStore(directory))
        self._nodes: dict[int, StagedInode] = {}  # changed since the last sync
        self._gone: set[int] = set()
        self._entries: dict[tuple[int, bytes], int | None] = {}
        self._meta: dict[str, object] = {}  # serialized at sync: the latest values win
        self._fds: dict[int, int] = {}
        self._written: set[int] = set()  # data files written since the last durable sync
        self._blocks: dict[int, int] = {}  # st_blocks of data files unchanged since read

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.store.close()

    # --- what changed: remembered here, written by sync() -------------------------------

    def node_changed(self, node: StagedInode) -> None:
        self._nodes[node.ino] = node
        self._gone.discard(node.ino)

    def node_gone(self, ino: int) -> None:
        self._nodes.pop(ino, None)
        self._gone.add(ino)
        self.drop_data(ino)

    def entry_set(self, directory: int, name: bytes, child: int | None) -> None:
        self._entries[(directory, name)] = child

    def meta_set(self, key: str, value: object) -> None:
        self._meta[key] = value

    @property
    def pending(self) -> bool:
        return bool(self._nodes or self._gone or self._entries or self._meta)

    def sync(self, durable: bool = False) -> None:
        """Write every pending change at once (one transaction, or one journal record);
        durable: fsync data files first and make the write itself survive power loss
        (never for a volatile staging)."""
        durable = durable and not self.volatile
        if durable:
            self._flush_data()
        if not self.pending and not durable:
            return
        self.store.write(SyncBatch(list(self._gone), [_row(n) for n in self._nodes.values()],
                                [(d, n, c) for (d, n), c in self._entries.items()],
                                {k: json.dumps(v) for k, v in self._meta.items()}), durable)
        self._nodes.clear()
        self._gone.clear()
        self._entries.clear()
        self._meta.clear()

    # --- reading it back (remount, offline commit) ---------------------------------------

    def load_meta(self) -> dict[str, object]:
        return {k: json.loads(v) for k, v in self.store.meta()}

    def load_nodes(self) -> dict[int, StagedInode]:
        nodes = {node.ino: node for node in map(_from_row, self.store.rows())}
        for d, name, child in self.store.entries():
            node = nodes.get(d)
            if node is not None and node.entries is not None:
                node.entries[bytes(name)] = child
        return nodes

    def _flush_data(self) -> None:
        """Make every data file written since the last durable sync durable: one fsync
        each when they are few, one syncfs of the staging's filesystem when many."""
        if len(self._written) > SYNCFS_ABOVE:
            syncfs_path(self.data_dir)
        else:
            for ino in list(self._written):
                open_fd = self._fds.get(ino)
                if open_fd is not None:
                    os.fsync(open_fd)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(self.data_path(ino), os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        self._written.clear()

    # --- data files ----------------------------------------------------------------------

    def data_path(self, ino: int) -> str:
        return os.path.join(self.data_dir, f"{ino:x}")

    def data_fd(self, ino: int) -> int:
        """An open descriptor of ino's data file (created if missing).  At most MAX_FDS
        stay open: the least recently used is closed (and reopened when needed)."""
        fd = self._fds.pop(ino, None)
        if fd is None:
            fd = os.open(self.data_path(ino), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            while len(self._fds) >= MAX_FDS:
                os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[ino] = fd  # (re)inserted last: the dict's order is the LRU order
        return fd

    def data_blocks(self, ino: int) -> int:
        """512-byte blocks of ino's data file (0 without one), kept until the file changes
        (wrote): every getattr and listing of a staged file asks.  Read by its open
        descriptor or its name: a listing of many staged files must not open each one (and
        close the descriptors of files in use, MAX_FDS at most stay open)."""
        blocks = self._blocks.get(ino)
        if blocks is None:
            fd = self._fds.get(ino)
            try:
                blocks = (os.fstat(fd) if fd is not None
                          else os.stat(self.data_path(ino))).st_blocks
            except FileNotFoundError:
                blocks = 0
            self._blocks[ino] = blocks
        return blocks

    def has_data(self, ino: int) -> bool:
        return ino in self._fds or os.path.exists(self.data_path(ino))

    def wrote(self, ino: int) -> None:
        """ino's data file changed."""
        self._written.add(ino)
        self._blocks.pop(ino, None)

    def release_fd(self, ino: int) -> None:
        """Close a data file no opener uses (it is opened again on demand, and fsynced
        by name if a durable sync needs it)."""
        fd = self._fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def drop_data(self, ino: int) -> None:
        fd = self._fds.pop(ino, None)
        self._written.discard(ino)
        self._blocks.pop(ino, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_path(ino))

    def staged_bytes(self) -> int:
        return directory_bytes(self.dir)


def directory_bytes(path: str) -> int:
    """Bytes a directory's files take on disk (allocated blocks, so holes are free)."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


class SqliteStore:
    """A durable session's metadata: SQLite (WAL), one transaction per sync."""

    def __init__(self, directory: str) -> None:
        self.db = sqlite3.connect(os.path.join(directory, "staging.db"),
                                  isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def write(self, change: SyncBatch, durable: bool) -> None:
        db = self.db
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM inodes WHERE ino=?", [(i,) for i in change.gone])
                db.executemany("DELETE FROM entries WHERE dir=?", [(i,) for i in change.gone])
                db.executemany(_UPSERT_INODE, change.rows)
                db.executemany("DELETE FROM entries WHERE dir=? AND name=?",
                               [(d, n) for d, n, c in change.entries if c is None])
                db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?)",
                               [e for e in change.entries if e[2] is not None])
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)",
                               list(change.meta.items()))
                if durable:  # a transaction that writes, so the WAL is fsynced now
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('synced', 'true')")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                    db.execute("ROLLBACK")
                raise
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    def meta(self) -> Iterator[tuple[str, str]]:
        yield from self.db.execute("SELECT key, value FROM meta")

    def rows(self) -> Iterator[sqlite3.Row]:
        cursor = self.db.cursor()
        cursor.row_factory = sqlite3.Row
        yield from cursor.execute(_SELECT_INODES)

    def entries(self) -> Iterator[tuple[int, bytes, int]]:
        yield from self.db.execute("SELECT dir, name, child FROM entries")

    def close(self) -> None:
        self.db.close()


_LENGTH = struct.Struct("<I")


class JournalStore:
    """A volatile session's metadata: `staging.journal`, one appended record per sync
    (see the module's docstring), replayed whole when read.

    One process at a time has it open, under an exclusive flock: the session's mount
    process lets go of it last, once it wrote the session and marked it ended
    (mounts._writable), so that its verb, waiting for the lock, commits the session
    while the mount process is still freeing its memory (~5 ms for its ~35 MB)."""

    def __init__(self, directory: str, wait: float = 0.0) -> None:
        self.path = os.path.join(directory, "staging.journal")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                          0o600)
        try:
            _lock(self.fd, self.path, wait)
            self.size = os.fstat(self.fd).st_size
        except BaseException:
            os.close(self.fd)
            raise
        self._replay: _Replayed | None = None

    def write(self, change: SyncBatch, durable: bool) -> None:
        blob = marshal.dumps((change.gone, change.rows, change.entries, change.meta))
        record = _LENGTH.pack(len(blob)) + blob
        try:
            if os.write(self.fd, record) != len(record):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        except OSError:
            os.ftruncate(self.fd, self.size)  # never half a record before the next one
            raise
        self.size += len(record)
        if self._replay is not None:  # what was read stays true: the record applied to it
            _replay_record(self._replay, change)

    def meta(self) -> Iterator[tuple[str, str]]:
        yield from self._replayed()[0].items()

    def rows(self) -> Iterator[dict[str, Any]]:
        for row in self._replayed()[1].values():
            yield dict(zip(INODE_COLUMNS, row, strict=True))

    def entries(self) -> Iterator[tuple[int, bytes, int]]:
        for d, names in self._replayed()[2].items():
            for name, child in names.items():
                yield d, name, child

    def close(self) -> None:
        os.close(self.fd)

    def _replayed(self) -> _Replayed:
        """The journal's records applied in order: meta, rows by inode, entries by
        directory (kept until the next write)."""
        if self._replay is not None:
            return self._replay
        state: _Replayed = ({}, {}, {})
        for at, batch in self._records():
            try:
                _replay_record(state, batch)
            except (ValueError, TypeError) as e:
                raise CorruptImage(self.path, f"staging journal record at {at}: {e}") from None
        self._replay = state
        return state

    def _records(self) -> Iterator[tuple[int, SyncBatch]]:
        """(offset, record) of each whole record; one cut short by a crash ends them."""
        with open(self.path, "rb") as fh:
            data = fh.read()
        at = 0
        while at + _LENGTH.size <= len(data):
            (n,) = _LENGTH.unpack_from(data, at)
            start = at + _LENGTH.size
            if start + n > len(data):
                return
            try:
                record = marshal.loads(data[start:start + n])
                gone, changed, entries_set, meta_set = record
                if not (isinstance(gone, list) and isinstance(changed, list)
                        and isinstance(entries_set, list) and isinstance(meta_set, dict)):
                    raise ValueError("not a journal record")
            except (ValueError, EOFError, TypeError) as e:
                raise CorruptImage(self.path, f"staging journal record at {at}: {e}") from None
            yield at, SyncBatch(gone, changed, entries_set, meta_set)
            at = start + n


# A journal's state: meta values (JSON text), inode rows by number, entries by directory.
_Replayed = tuple[dict[str, str], dict[int, tuple[Any, ...]], dict[int, dict[bytes, int]]]


def _replay_record(state: _Replayed, batch: SyncBatch) -> None:
    """Apply one journal record to state, in the order SqliteStore.write applies it."""
    meta, rows, entries = state
    for ino in batch.gone:
        rows.pop(ino, None)
        entries.pop(ino, None)
    for row in batch.rows:
        if len(row) != len(INODE_COLUMNS):
            raise ValueError(f"an inode row of {len(row)} fields")
        rows[row[0]] = row  # type: ignore[index]
    for d, name, child in batch.entries:
        if child is None:
            entries.get(d, {}).pop(name, None)
        else:
            entries.setdefault(d, {})[name] = child
    meta.update(batch.meta)


LOCK_POLL = 0.0005  # seconds between two tries of a lock somebody holds


def _lock(fd: int, path: str, wait: float) -> None:
    """An exclusive flock on fd, waited for up to wait seconds; BlockingIOError when it is
    still held by then."""
    if not flock_within(fd, wait, LOCK_POLL):
        raise BlockingIOError(errno.EWOULDBLOCK, "in use by another process", path)
