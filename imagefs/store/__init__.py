"""A content-addressed store of indices on an S3 object store, shared by many sites.

An index pushed to `s3://BUCKET/PREFIX` is three kinds of object (docs/store.md):

* `PREFIX/packs/SHA256`: a pack frame exactly as an image file stores it (header and zstd
  payload), named by the SHA-256 of its bytes: content-addressed, so it is uploaded once
  for every index and image that holds it, and checked against its name when fetched;
* `PREFIX/bundles/SHA256`: an index's metadata: an imagefs file holding only its records,
  the chunk table of its packs and the commit naming it, plus the list of the pack objects
  its pack ids stand for (layout.py);
* `PREFIX/refs/NAME`: a small document naming the bundle of the index NAME, written last:
  a reader sees the old index or the new one, never a half-pushed one.

Pulling is an export whose source is a bundle (bundle_file.py: pack frames are fetched from
the store as they are read), so only the packs holding chunks the local file lacks move.
"""

from __future__ import annotations


def is_store_url(text: str) -> bool:
    """Whether text names a store (s3://...) rather than an image file: here, not in
    client.py, so that a mount process asks it without importing the store's client."""
    return text.startswith("s3://")
