"""Where a store is (`s3://BUCKET/PREFIX`) and how it is spoken to: boto3, and GETs signed
here when the credentials and the endpoint are plainly given (signed.py).

boto3 is the client every S3-compatible store is tested against (AWS S3, Ceph RGW, MinIO,
SeaweedFS), and it takes credentials, region and endpoint the way admins already set them:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or `AWS_PROFILE`, ~/.aws, an instance role),
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`; imagefs adds `--endpoint URL` and
`IMAGEFS_S3_ENDPOINT`.  Never a secret on the command line.  It is imported only when
needed (~0.3 s with its client): by writes, and by reads signed.py cannot sign.

Every failure of the store becomes one line (StoreFailed, exit code 8), and every object
read is bounded before it is read: a store is as hostile as an image file.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from imagefs.errors import NoSuchObject, StoreFailed, UsageError, one_line

from . import is_store_url
from .signed import SignedReads, from_environment

ENDPOINT_ENV = "IMAGEFS_S3_ENDPOINT"
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")  # S3's rules for new buckets
PREFIX_PART = re.compile(r"[A-Za-z0-9._=+@,-]{1,200}\Z")
CHUNK = 1 << 20  # bytes read from a response at a time
PACK_ATTEMPTS = 3  # a signed GET's tries, as the client's standard retry mode makes
RETRIED = (429, 500, 502, 503, 504)  # answers that a signed GET tries again
ERROR_DOCUMENT = 4096  # bytes of an S3 error document read for its code and message
ERROR_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
ERROR_MESSAGE = re.compile(r"<Message>([^<]{1,300})</Message>")


@dataclass(frozen=True)
class StoreUrl:
    """s3://BUCKET/PREFIX: a bucket and a folder in it (the prefix may be empty)."""

    bucket: str
    prefix: str

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_url(text: str) -> StoreUrl:
    """s3://BUCKET[/PREFIX]; UsageError (one line) for anything else.  The prefix's parts
    are plain names: no empty part, no `.` or `..`, nothing a shell or a log would mangle."""
    if not is_store_url(text):
        raise UsageError(f"{one_line(text)}: not a store (s3://BUCKET/PREFIX expected)")
    bucket, _, prefix = text[len("s3://"):].partition("/")
    if not BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(f"{one_line(text)}: {one_line(bucket)!r} is not a bucket name "
                         "(3-63 of a-z, 0-9, '.', '-')")
    prefix = prefix.strip("/")
    for part in prefix.split("/") if prefix else []:
        if not PREFIX_PART.match(part) or part in (".", ".."):
            raise UsageError(f"{one_line(text)}: {one_line(part)!r} is not a plain folder "
                             "name (A-Z, a-z, 0-9 and ._=+@,- only)")
    return StoreUrl(bucket, prefix)


@dataclass
class ObjectInfo:
    key: str
    size: int
    modified: datetime


class Store:
    """One bucket and prefix, through one boto3 client (thread-safe) and, for GETs, signed
    reads when it can.  Counts the bytes it moves (sent, received): what a push or a pull
    reports."""

    def __init__(self, url: StoreUrl, endpoint: str | None = None) -> None:
        self.url = url
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid = 0
        # GETs signed here when credentials and endpoint are plainly given (signed.py)
        self.signed: SignedReads | None = from_environment(self.endpoint)
        if self.signed is None:
            self.s3  # noqa: B018 (a bad endpoint is refused here, not at the first request)

    @property
    def s3(self) -> Any:
        """This process's boto3 client: a forked mount process makes its own (a client's
        pooled connections must not be shared by two processes)."""
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            # Checksums only where S3 requires them: every object is named by its SHA-256
            # and checked against it, so botocore's own CRC32 of each body (on by default
            # since 1.36) is CPU spent twice; nor does botocore check the parameters this
            # module builds.  200 GETs of packs: 0.39 -> 0.31 s of CPU.
            config = Config(retries={"max_attempts": 3, "mode": "standard"},
                            connect_timeout=5, read_timeout=60, max_pool_connections=16,
                            s3={"addressing_style": "path"}, parameter_validation=False,
                            request_checksum_calculation="when_required",
                            response_checksum_validation="when_required")
            try:
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint, config=config,
                    region_name=os.environ.get("AWS_DEFAULT_REGION")
                    or os.environ.get("AWS_REGION") or "us-east-1")
            except ValueError as e:  # an endpoint that is not a URL
                raise UsageError(f"--endpoint: {one_line(str(e))}") from None
            self._pid = os.getpid()
        return self._client

    def _where(self, key: str) -> str:
        """key (which holds the prefix) as the URL an admin would write."""
        return f"{self.url}/{key[len(self.url.prefix):].lstrip('/')}" if key else str(self.url)

    def _bounded(self, key: str, size: int, limit: int) -> int:
        """size, the length an answer announces, refused before its body is read when it
        is unknown or more than limit."""
        if size < 0 or size > limit:
            raise StoreFailed(self._where(key), f"holds {size} bytes, more than the {limit} "
                                                "such an object may hold")
        return size

    def _failed(self, e: Exception, key: str = "") -> Exception:
        """The one-line error for what boto3 (or urllib3, or the OS) raised."""
        where = self._where(key)
        if not type(e).__module__.startswith("botocore"):
            return StoreFailed(where, f"the store cannot be reached: {one_line(str(e))}")
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(e, NoCredentialsError):
            return StoreFailed(str(self.url), "no S3 credentials: set AWS_ACCESS_KEY_ID and "
                                              "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return NoSuchObject(where, "no such object in the store")
            if code == "NoSuchBucket":
                return NoSuchObject(str(self.url), f"no bucket {self.url.bucket}")
            message = str(e.response.get("Error", {}).get("Message", "")) or code
            return StoreFailed(where, f"the store refused: {code}: {one_line(message)}")
        return StoreFailed(where, f"the store cannot be reached: {one_line(str(e))}")

    def _call(self, key: str, method: str, **params: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.s3, method)(Bucket=self.url.bucket, **params)
        except (BotoCoreError, ClientError) as e:
            raise self._failed(e, key) from None

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and age; None when there is none."""
        try:
            r = self._call(key, "head_object", Key=key)
        except NoSuchObject:
            return None
        return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"])

    def get(self, key: str, limit: int) -> bytes:
        """The object's bytes; refused (before reading them) when it holds more than limit."""
        if self.signed is not None:
            return self._fetch(key, limit)
        return b"".join(self.read(key, limit))

    def read(self, key: str, limit: int) -> Iterator[bytes]:
        """The object's bytes, a block at a time; its size is checked against limit first."""
        if self.signed is not None:
            body: Any = self._answer(key)
            length = body.headers.get("Content-Length")
        else:
            r = self._call(key, "get_object", Key=key)
            body, length = r["Body"], r.get("ContentLength")
        got, size = 0, -1
        errors: tuple[type[Exception], ...] = (OSError, *_read_errors(self.signed is None))
        try:
            size = self._bounded(key, _length(length), limit)
            while block := body.read(CHUNK):
                got += len(block)
                if got > size:
                    raise StoreFailed(self._where(key), "longer than the store said")
                with self._lock:
                    self.received += len(block)
                yield block
            if got != size:
                raise StoreFailed(self._where(key), f"ended after {got} of {size} bytes")
        except errors as e:
            raise self._failed(e, key) from None
        finally:
            _finish(body, got == size)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """length bytes of the object from start (fewer if it ends before)."""
        if length <= 0:
            return b""
        if self.signed is not None:
            return self._fetch(key, length, (start, length))
        from botocore.exceptions import BotoCoreError

        r = self._call(key, "get_object", Key=key, Range=f"bytes={start}-{start + length - 1}")
        try:
            data = r["Body"].read(length + 1)
        except (BotoCoreError, OSError) as e:
            raise self._failed(e, key) from None
        finally:
            r["Body"].close()
        if len(data) > length:
            raise StoreFailed(self._where(key), "answered more than the range asked for")
        with self._lock:
            self.received += len(data)
        return data

    # --- GETs signed here (signed.py) -------------------------------------------------

    def _fetch(self, key: str, limit: int, span: tuple[int, int] | None = None) -> bytes:
        """The whole answer of a signed GET (of span, (first, length), when given), its
        announced size bounded by limit; an answer cut short is asked again, as boto3's
        standard retries would."""
        from urllib3.exceptions import HTTPError  # a body cut short: IncompleteRead

        for attempt in range(PACK_ATTEMPTS):
            last = attempt + 1 == PACK_ATTEMPTS
            response = self._answer(key, span)
            data, size = b"", -1
            try:
                size = self._bounded(key, _length(response.headers.get("Content-Length")),
                                     limit)
                data = response.read(size + 1)
            except (HTTPError, OSError) as e:
                if last:
                    got = _cut_short(e)
                    raise (self._failed(e, key) if got is None else StoreFailed(
                        self._where(key), f"ended after {got} of {size} bytes")) from None
            finally:
                _finish(response, len(data) == size)
            if len(data) == size:
                with self._lock:
                    self.received += size
                return data
            if len(data) > size or last:
                raise StoreFailed(self._where(key), f"ended after {len(data)} of {size} bytes"
                                  if len(data) < size else "longer than the store said")
            time.sleep(0.1 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _answer(self, key: str, span: tuple[int, int] | None = None) -> Any:
        """A signed GET's answer with its body still to read (200, or 206 for a span);
        a store that is busy (RETRIED) or cannot be reached is tried again."""
        from urllib3.exceptions import HTTPError

        assert self.signed is not None
        for attempt in range(PACK_ATTEMPTS):
            last = attempt + 1 == PACK_ATTEMPTS
            try:
                response = self.signed.get(self.url.bucket, key, *(span or (None, None)))
            except (HTTPError, OSError) as e:
                if last:
                    raise self._failed(e, key) from None
            else:
                if response.status == (206 if span else 200):
                    return response
                try:
                    if response.status not in RETRIED or last:
                        raise self._refused(key, response)
                finally:
                    _finish(response, False)
            time.sleep(0.1 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _refused(self, key: str, response: Any) -> Exception:
        """The one-line error for a signed GET's answer that is not the object: S3's
        error document names a code and a message (read bounded: it is the store's)."""
        text = response.read(ERROR_DOCUMENT, decode_content=False).decode(errors="replace")
        code, message = _tag(ERROR_CODE, text), _tag(ERROR_MESSAGE, text)
        if code == "NoSuchBucket":
            return NoSuchObject(str(self.url), f"no bucket {self.url.bucket}")
        if response.status == 404:
            return NoSuchObject(self._where(key), "no such object in the store")
        why = f"{code}: {one_line(message or code)}" if code else f"HTTP {response.status}"
        return StoreFailed(self._where(key), f"the store refused: {why}")

    def put(self, key: str, data: bytes) -> None:
        self._call(key, "put_object", Key=key, Body=data)
        with self._lock:
            self.sent += len(data)

    def touch(self, key: str) -> None:
        """Make an object young again (a copy onto itself): gc spares it for a grace
        period (docs/store.md)."""
        self._call(key, "copy_object", Key=key, MetadataDirective="REPLACE",
                   CopySource={"Bucket": self.url.bucket, "Key": key},
                   Metadata={"touched": "1"})

    def delete(self, key: str) -> None:
        self._call(key, "delete_object", Key=key)

    def list(self, folder: str) -> Iterator[ObjectInfo]:
        """Every object under PREFIX/folder/."""
        from botocore.exceptions import BotoCoreError, ClientError

        base = self.url.key(folder) + "/"
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.url.bucket, Prefix=base)
            for page in pages:
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"])
        except (BotoCoreError, ClientError) as e:
            raise self._failed(e, base) from None

    def ensure_bucket(self) -> None:
        """Create the bucket when it is missing (and the store lets us)."""
        try:
            self._call("", "head_bucket")
        except NoSuchObject:  # _failed's word for a 404
            self._call("", "create_bucket")


def _length(value: Any) -> int:
    """An answer's Content-Length as a number; -1 (refused by _bounded) when it has none."""
    try:
        return int(value) if value is not None else -1
    except ValueError:
        return -1


def _cut_short(e: Exception) -> int | None:
    """The bytes a body cut short brought (urllib3's IncompleteRead, maybe wrapped in its
    ProtocolError); None for any other error."""
    from urllib3.exceptions import IncompleteRead

    for cause in (e, *e.args):
        if isinstance(cause, IncompleteRead):
            return int(cause.partial)
    return None


def _tag(pattern: re.Pattern[str], text: str) -> str:
    found = pattern.search(text)
    return found.group(1) if found else ""


def _read_errors(boto: bool) -> tuple[type[Exception], ...]:
    """What reading an answer's body raises besides OSError: urllib3's errors (a signed
    GET's body, and beneath boto3's), and boto3's own."""
    from urllib3.exceptions import HTTPError

    if not boto:
        return (HTTPError,)
    from botocore.exceptions import BotoCoreError

    return (HTTPError, BotoCoreError)


def _finish(body: Any, whole: bool) -> None:
    """Done with an answer's body: a signed GET's connection goes back to the pool when
    its body was read whole, and is closed otherwise (the rest would be read as the next
    answer); boto3's body is closed."""
    if hasattr(body, "release_conn"):
        if not whole:
            body.close()
        body.release_conn()
    else:
        body.close()
