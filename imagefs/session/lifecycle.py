"""Sessions: writable mounts of an index, their staging, and their commit or discard.

A session lives in STATE_DIR/sessions/<id>/ (see staging.py for what is inside) and
outlives its mount process: a mount process that dies leaves the session *stale*, and
`imagefs remount` serves it again with every change its staging recorded.  `session.json`
holds what listing needs (image, index, mountpoint, pid); the staging database holds the
base and the changes.

Which index a session belongs to is remembered by name and by the root the index had when
the session last agreed with it (opened, or committed): a commit finds the index by name
and refuses if its root moved on (another session or capture committed there), unless the
changes go into a new index.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from imagefs.errors import BaseChanged, IndexGone, SessionLive, UsageError
from imagefs.format.commit_record import Commit, IndexEntry
from imagefs.format.container import ImageFile, crash_point, now_iso
from imagefs.mount.options import pack_cache

from .info import (  # noqa: F401  (re-exported: where callers have always found them)
    SessionInfo,
    discard,
    find_session,
    list_sessions,
)

if TYPE_CHECKING:  # the session machinery loads when a session is opened, not listed
    from imagefs.format.packs import PrecompressedPack
    from imagefs.format.writer import Transaction
    from imagefs.image import Image

    from .commit import Written
    from .staging import Staging
    from .tree import SessionTree

META_CACHE = 24 << 20
# Decompressed packs of a servicing transaction's session (volatile): its tools (dpkg and
# the libraries it runs on, dpkg's database) read from ~25 packs at once; with the 8 MiB of
# a mount's default, `package add` of hello decompressed 35 packs, 10 of them twice.  The
# session lives for one transaction, so the memory is held only that long.
TRANSACTION_CACHE = 64 << 20
LOCK_WAIT = 30.0  # seconds a volatile session's mount process may take to let go of it
INODE_CACHE_WEIGHT = 32_768


def _owner(requested: int | None) -> int:
    """The session's owner: the caller, or for root the uid it opens the session for (the
    daemon opens sessions for its clients)."""
    return requested if requested is not None and os.geteuid() == 0 else os.getuid()


def _uuid(image: ImageFile) -> str:
    return image.header.uuid.hex()


class Session:
    """An open session: its staging, the base index it writes over, and its tree."""

    def __init__(self, info: SessionInfo, image: Image, staging: Staging,
                 tree: SessionTree) -> None:
        self.info = info
        self.image = image
        self.staging = staging
        self.tree = tree

    # --- opening ----------------------------------------------------------------------

    @classmethod
    def create(cls, image_path: str, index_spec: str, mountpoint: str,
               cache: int | None = None, owner: int | None = None,
               volatile: bool = False) -> Session:
        """A new session of index_spec, owned by the caller (root: by owner, if given);
        volatile: never fsynced (see Staging), for a session that is never resumed."""
        from imagefs.image import Image

        from .staging import NEW_INO_BASE, Staging

        img = Image.open(image_path)
        try:
            number, entry = img.select(index_spec)
            info = SessionInfo(id=secrets.token_hex(4), image=os.path.abspath(image_path),
                               uuid=_uuid(img.file), index=number, name=entry.name,
                               mountpoint=mountpoint, pid=0, created=now_iso(),
                               uid=_owner(owner), volatile=volatile)
            os.makedirs(info.dir, mode=0o700)
            staging = Staging(info.dir, volatile)
            staging.meta_set("base_root", entry.root)
            staging.meta_set("commit_root", entry.root)
            staging.meta_set("index_name", entry.name)
            staging.meta_set("counts", {"files": entry.files, "dirs": entry.dirs,
                                        "bytes": entry.bytes})
            staging.meta_set("next_ino", NEW_INO_BASE)
            staging.sync(durable=True)
            info.save()
        except BaseException:
            img.close()
            raise
        return cls._assemble(info, img, staging, cache)

    @classmethod
    def load(cls, info: SessionInfo, cache: int | None = None,
             wait: float = LOCK_WAIT) -> Session:
        """The session, opened; a volatile one is waited for (wait seconds at most, else
        SessionLive) while another process has it open: its mount process, ending."""
        from imagefs.image import Image

        from .staging import Staging

        img = Image.open(info.image)
        try:
            if _uuid(img.file) != info.uuid:
                raise UsageError(f"{info.image}: not the image session {info.id} was opened "
                                 "on (it was replaced); discard the session")
            try:
                staging = Staging(info.dir, info.volatile, wait)
            except BlockingIOError:
                raise SessionLive(info.id, info.pid, info.mountpoint) from None
        except BaseException:
            img.close()
            raise
        return cls._assemble(info, img, staging, cache)

    @classmethod
    def _assemble(cls, info: SessionInfo, img: Image, staging: Staging,
                  cache: int | None) -> Session:
        from imagefs.format.decoded import decoded_packs
        from imagefs.format.packs import PackReader
        from imagefs.format.records import MetaReader
        from imagefs.format.view import IndexView
        from imagefs.mount.tree import IndexTree

        from .staging import NEW_INO_BASE
        from .tree import Counts, SessionTree

        meta = staging.load_meta()
        base_root = int(meta["base_root"])  # type: ignore[call-overload]
        number, entry = _find_index(img.indices, str(meta["index_name"]))
        base_entry = replace(entry, root=base_root) if entry is not None else IndexEntry(
            info.name, "", "", "", 0, 0, 0, base_root, "")
        view = IndexView(img.file, number or info.index, base_entry,
                         meta=MetaReader(img.file, META_CACHE),
                         packs=PackReader(img.file, cache_bytes=pack_cache(
                             cache, img.file.header, TRANSACTION_CACHE if info.volatile
                             else None), decoded=decoded_packs() if info.volatile else None))
        base = IndexTree(view, inode_cache_weight=INODE_CACHE_WEIGHT)
        nodes = staging.load_nodes()
        counts = Counts(**meta["counts"])  # type: ignore[arg-type]
        tree = SessionTree(base, staging, nodes, counts,
                           int(meta.get("next_ino", NEW_INO_BASE)))  # type: ignore[call-overload]
        session = cls(info, img, staging, tree)
        session._settle(meta)
        return session

    def _settle(self, meta: dict[str, object]) -> None:
        """Finish what a crash interrupted: a commit that did or did not publish, and
        inodes left without a name (open when the mount process died)."""
        publishing = meta.get("publishing")
        if publishing is not None:
            assert isinstance(publishing, list)
            name, root = str(publishing[0]), int(publishing[1])
            _n, entry = _find_index(self.image.indices, name)
            if entry is not None and entry.root == root:
                self.staging.meta_set("commit_root", root)
                self.staging.meta_set("index_name", name)
            self.staging.meta_set("publishing", None)
        for ino, node in list(self.tree.nodes.items()):
            if node.nlink == 0:
                del self.tree.nodes[ino]
                self.staging.node_gone(ino)
        self.staging.sync(durable=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.staging.sync()
        self.staging.close()
        self.image.close()

    # --- commit -----------------------------------------------------------------------

    def commit(self, new_index: str | None = None, description: str = "",
               wait: float | None = None, level: int = 9,
               progress: Callable[[int], None] | None = None,
               who: dict[str, Any] | None = None) -> dict[str, object]:
        """Publish the session's changes into its index (or as a new one); the session goes
        on from the published state."""
        from imagefs.format.writer import history_entry

        def history(written: Written) -> dict[str, Any]:
            return history_entry("commit", who, session=self.info.id,
                                 source_index=str(self.staging.load_meta()["index_name"]),
                                 result={"records": written.records,
                                         "new_bytes": written.new_bytes})

        return commit_together([self], [history], new_index, description, wait, level,
                               progress)[0]

    def _write_into(self, tx: Transaction, new_index: str | None,
                    progress: Callable[[int], None] | None
                    ) -> tuple[Written, int, IndexEntry | None, str]:
        """Check that the session may publish into tx's state, then write its changes:
        what was written, and the index it goes to (number, entry, name)."""
        from imagefs.image import check_new_name

        from .commit import ChangeWriter

        self.staging.sync()
        meta = self.staging.load_meta()
        index_name = str(meta["index_name"])
        commit_root = int(meta["commit_root"])  # type: ignore[call-overload]
        if _uuid(tx.image) != self.info.uuid:
            raise UsageError(f"{self.info.image}: not the image this session was opened on")
        number, entry = _find_index(tx.commit.indices, index_name)
        if new_index is not None:
            check_new_name(tx.commit, new_index)
        elif entry is None:
            raise IndexGone(self.info.image, index_name)
        elif entry.root != commit_root:
            raise BaseChanged(self.info.image, index_name)
        return ChangeWriter(self.tree, tx, progress).write(), number, entry, index_name

    def _record(self, commit: Commit, written: Written, found: tuple[int, IndexEntry | None],
                index_name: str, new_index: str | None, description: str,
                history: dict[str, Any]) -> tuple[int, str]:
        """Enter the written tree in the commit record being made, with its history: as
        the new index new_index, else as index_name's new state.  Its number and name."""
        from imagefs.format.writer import TreeStats, add_index

        number, entry = found
        counts = self.tree.counts
        stats = TreeStats(written.root, written.digest, counts.files, counts.dirs,
                          counts.bytes)
        if new_index is not None:
            return add_index(commit, new_index, description or (
                entry.description if entry else ""), stats, history), new_index
        assert entry is not None
        entry.root, entry.digest = written.root, written.digest.hex()
        entry.files, entry.dirs, entry.bytes = counts.files, counts.dirs, counts.bytes
        entry.modified = now_iso()
        entry.history = [*entry.history, history]
        return number, index_name

    def _published(self, written: Written, number: int, name: str) -> None:
        """After the publish: the written nodes are clean, the session goes on from the
        published root (and index, if the changes went to a new one)."""
        for ino, ref in written.refs.items():
            node = self.tree.nodes[ino]
            node.dirty = False
            node.committed = ref
            self.staging.node_changed(node)
        self.staging.meta_set("commit_root", written.root)
        self.staging.meta_set("index_name", name)
        self.staging.meta_set("publishing", None)
        self.staging.sync(durable=True)
        if name != self.info.name or number != self.info.index:
            self.info.name, self.info.index = name, number
            self.info.save()


History = Callable[["Written"], dict[str, Any]]


def commit_together(sessions: list[Session], histories: list[History],
                    new_index: str | None = None, description: str = "",
                    wait: float | None = None, level: int = 9,
                    progress: Callable[[int], None] | None = None,
                    offered: list[PrecompressedPack] | None = None) -> list[dict[str, object]]:
    """Publish the changes of sessions of one image in ONE commit: all of them, or (on any
    error) none.  histories[i](written) is the history entry of session i's index.  With
    new_index (one session only) the changes become that new index.  offered: packs
    compressed ahead of the commit (imagefs.format.ahead), used where the sessions store
    their chunks."""
    from imagefs.format.writer import Transaction

    if not sessions:
        return []
    if new_index is not None and len(sessions) > 1:
        raise UsageError("a new index takes the changes of one index, not several")
    image_path = sessions[0].info.image
    if any(s.info.image != image_path for s in sessions):
        raise UsageError("sessions of different images cannot be published together")
    results: list[dict[str, object]] = []
    done: list[tuple[Session, Written, int, str]] = []
    with ImageFile.open(image_path, writable=True) as f, \
            Transaction(f, level, wait=wait, offered=offered) as tx:
        for session, history in zip(sessions, histories, strict=True):
            written, number, entry, index_name = session._write_into(tx, new_index, progress)
            if new_index is None and entry is not None and written.root == entry.root:
                results.append({"changed": False, "index": number, "name": index_name,
                                "records": 0, "new_bytes": 0})
                continue
            number, name = session._record(tx.commit, written, (number, entry), index_name,
                                           new_index, description, history(written))
            done.append((session, written, number, name))
            results.append({"changed": True, "index": number, "name": name,
                            "records": written.records, "new_bytes": written.new_bytes,
                            "digest": written.digest.hex()})
        if not done:
            return results
        for session, written, _number, name in done:
            session.staging.meta_set("publishing", [name, written.root])
            session.staging.sync(durable=True)
        tx.publish()
    crash_point("after-publish")
    for session, written, number, name in done:
        session._published(written, number, name)
    return results


def _find_index(indices: list[IndexEntry], name: str) -> tuple[int, IndexEntry | None]:
    """The index named name (never a number), and its number; 0 and None if none."""
    from imagefs.image import find_index

    return find_index(indices, name, by_number=False) or (0, None)
