"""The on-disk format, in one place.  docs/format.md describes the same layouts in prose.

All integers are little-endian.  Every structure here is a fixed layout with each field's
offset and width beside it, kept apart from the in-memory objects it is read into.

File = header (4096 bytes) followed by frames, back to back, up to the committed end.

Header, offset 0 (only bytes 0..HEADER_USED are meaningful; the rest of the 4096 are zero):
    0    8  magic            b"IMAGEFS\\0"
    8    4  format version   u32; a reader refuses a version above FORMAT_VERSION
    12   4  header size      u32 = 4096
    16  16  file uuid        random, set at creation
    32   4  chunk min size   u32  (FastCDC parameters used for every capture into this file)
    36   4  chunk avg size   u32
    40   4  chunk max size   u32
    44   4  pack target size u32  (raw bytes of chunks packed into one zstd frame)
    48   8  xxh3_64 of bytes 0..48
Slot A at 512, slot B at 1024, 64 bytes each (the root pointers; see container.py):
    0    8  magic            b"IFSSLOT\\0"
    8    8  generation       u64; the valid slot with the highest generation is current
    16   8  commit offset    u64; file offset of the commit frame
    24   8  commit length    u64; bytes of the commit frame including its header
    32  16  xxh3_128 of the whole commit frame
    48   8  reserved, zero
    56   8  xxh3_64 of slot bytes 0..56
    A slot of 64 zero bytes is "never written".

Frame (everything after the header), FRAME_HEADER bytes then the payload:
    0    4  magic            b"IFF" + kind (b"P" pack, b"M" metadata, b"T" chunk table,
                             b"C" commit)
    4    4  codec            u32: 0 stored, 1 zstd
    8    8  stored length    u64; payload bytes following this header
    16   8  raw length       u64; bytes after decompression (≤ MAX_RAW[kind])
    24   8  xxh3_64 of the stored payload
    32   8  xxh3_64 of header bytes 0..32

Pack payload (raw): chunk bytes back to back.  A chunk is addressed by
(pack offset, offset in raw, length) and checked by its xxh3_128.

Metadata payload (raw):
    0    4  record count N   u32 (1..65535)
    4  4*(N+1) record offsets u32, ascending, last = end of the records
    then the records.  A record is addressed by ref = pack offset << 16 | record number,
    where the offset is the metadata frame's; it is also the inode number a mount shows.

Chunk table payload (raw): CHUNK_ENTRY.size bytes per chunk, see CHUNK_ENTRY.

Commit payload: UTF-8 JSON, see commit_record.Commit.
"""

from __future__ import annotations

import stat
import struct

MAGIC = b"IMAGEFS\0"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
HEADER = struct.Struct("<8sII16sIIII")  # through offset 48
HEADER_CHECK = struct.Struct("<Q")  # at 48
HEADER_USED = HEADER.size + HEADER_CHECK.size  # 56
SLOT_OFFSETS = (512, 1024)
SLOT_MAGIC = b"IFSSLOT\0"
SLOT = struct.Struct("<8sQQQ16s8s")  # 56 bytes, then xxh3_64
SLOT_SIZE = 64

FRAME_MAGIC = b"IFF"
FRAME = struct.Struct("<4sIQQQ")  # 32 bytes, then xxh3_64 of these
FRAME_HEADER = FRAME.size + 8  # 40
CODEC_STORED = 0
CODEC_ZSTD = 1

KIND_PACK = b"P"
KIND_META = b"M"
KIND_TABLE = b"T"
KIND_COMMIT = b"C"
KINDS = (KIND_PACK, KIND_META, KIND_TABLE, KIND_COMMIT)

MiB = 1 << 20
# Bounds on what a reader will allocate, whatever a (hostile) file claims.
MAX_RAW = {
    KIND_PACK: 16 * MiB,
    KIND_META: 64 * MiB,
    KIND_TABLE: 256 * MiB,
    KIND_COMMIT: 64 * MiB,
}

# Chunk table entry: xxh3_128 (16) | sha256 (32) | pack offset u64 | offset in pack u32 |
# length u32  = 64 bytes.
CHUNK_ENTRY = struct.Struct("<16s32sQII")
# A commit lists at most this many chunk-table segments; a writer that would list more
# rewrites the whole table as one segment.
MAX_TABLE_SEGMENTS = 16

# Defaults for a new file.
CHUNK_MIN = 16 * 1024
CHUNK_AVG = 64 * 1024
CHUNK_MAX = 256 * 1024
PACK_TARGET = 1 * MiB
# The compact profile (capture/export/optimize --compact): packs of the largest size a reader
# accepts in a header (MAX_RAW[P] // 2), compressed at zstd 19.  Bigger frames find the
# repeats that 1 MiB frames cut apart (the fixture pair: 67 MB of packs at 19 in 1 MiB
# frames, 61 MB in 8 MiB ones); readers need nothing new.
COMPACT_PACK_TARGET = 8 * MiB
COMPACT_LEVEL = 19
META_TARGET = 128 * 1024
MAX_RECORDS_PER_META = 0xFFFF

# Inode record, fixed part (INODE.size = 128 bytes):
#   0  1  kind (KIND_* below)       1  1  flags (0)     2  2  xattr count
#   4  4  st_mode                   8  4  uid           12 4  gid
#   16 4  nlink                     20 4  reserved (0)
#   24 8  size (regular: bytes; symlink: target length; dir: entry count)
#   32 8  rdev                      40 8  mtime ns (i64)   48 8  atime ns (i64)
#   56 8  ctime ns (i64)            64 32 node digest (sha256, see digest.py)
#   96 32 reserved (0)
# then xattrs, each: name length u8 | value length u32 | name | value
# then the body by kind:
#   regular: extent count u32, then EXTENT per extent (sorted by file offset, no overlap)
#   symlink: the target bytes (size of them)
#   directory: entry count u32, then per entry: child ref u64 | kind u8 | name length u8 |
#              name; sorted by name bytes, unique, no "/" or NUL, not "." or ".."
#   devices, fifo, socket: nothing
INODE = struct.Struct("<BBHIIIIIQQqqq32s32s")
XATTR_HEAD = struct.Struct("<BI")
EXTENT = struct.Struct("<QQII16s")  # file offset | pack offset | offset in pack | length | xxh3
DIRENT_HEAD = struct.Struct("<QBB")
U32 = struct.Struct("<I")

REG, DIR, LNK, CHR, BLK, FIFO, SOCK = range(1, 8)
KIND_NAMES = {
    REG: "file", DIR: "dir", LNK: "symlink", CHR: "chardev", BLK: "blockdev",
    FIFO: "fifo", SOCK: "socket",
}
# The kind of an inode whose st_mode has this file type (stat.S_IFMT(mode)): a capture's
# lstat and a writable mount's mknod/create come in as modes, the records hold kinds.
KIND_OF_MODE = {
    stat.S_IFREG: REG, stat.S_IFDIR: DIR, stat.S_IFLNK: LNK, stat.S_IFCHR: CHR,
    stat.S_IFBLK: BLK, stat.S_IFIFO: FIFO, stat.S_IFSOCK: SOCK,
}
MAX_XATTR_VALUE = 64 * 1024
MAX_SYMLINK = 4096
