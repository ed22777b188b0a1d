"""Where a store is (`s3://BUCKET/PREFIX`) and how it is spoken to: boto3.

boto3 is the client every S3-compatible store is tested against (AWS S3, Ceph RGW, MinIO,
SeaweedFS), and it takes credentials, region and endpoint the way admins already set them:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or `AWS_PROFILE`, ~/.aws, an instance role),
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`; imagefs adds `--endpoint URL` and
`IMAGEFS_S3_ENDPOINT`.  Never a secret on the command line.  It is imported only by the
verbs that use a store (~0.16 s).

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

ENDPOINT_ENV = "IMAGEFS_S3_ENDPOINT"
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")  # S3's rules for new buckets
PREFIX_PART = re.compile(r"[A-Za-z0-9._=+@,-]{1,200}\Z")
CHUNK = 1 << 20  # bytes read from a response at a time
PACK_ATTEMPTS = 3  # get_pack's tries, as the client's standard retry mode makes
RETRIED = (429, 500, 502, 503, 504)  # answers that get_pack tries again
PRESIGNED_SECONDS = 300


@dataclass(frozen=True)
class StoreUrl:
    """s3://BUCKET/PREFIX: a bucket and a folder in it (the prefix may be empty)."""

    bucket: str
    prefix: str

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def is_store_url(text: str) -> bool:
    return text.startswith("s3://")


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
    """One bucket and prefix, through one boto3 client (thread-safe).  Counts the bytes it
    moves (sent, received): what a push or a pull reports."""

    def __init__(self, url: StoreUrl, endpoint: str | None = None) -> None:
        self.url = url
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid = 0
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
        """The one-line error for what boto3 raised."""
        from botocore.exceptions import ClientError, NoCredentialsError

        where = self._where(key)
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
        return b"".join(self.read(key, limit))

    def read(self, key: str, limit: int) -> Iterator[bytes]:
        """The object's bytes, a block at a time; its size is checked against limit first."""
        from botocore.exceptions import BotoCoreError

        r = self._call(key, "get_object", Key=key)
        body = r["Body"]
        try:
            size = self._bounded(key, int(r.get("ContentLength", -1)), limit)
            got = 0
            while block := body.read(CHUNK):
                got += len(block)
                if got > size:
                    raise StoreFailed(self._where(key), "longer than the store said")
                with self._lock:
                    self.received += len(block)
                yield block
            if got != size:
                raise StoreFailed(self._where(key), f"ended after {got} of {size} bytes")
        except (BotoCoreError, OSError) as e:
            raise self._failed(e, key) from None
        finally:
            body.close()

    def get_pack(self, key: str, limit: int) -> bytes:
        """A pack object's bytes (bounded, as get): a GET of a presigned URL sent on the
        client's own HTTP session (its TLS, proxies and pool), retried as the client
        would.  A pack is the many-times-over request of reading an index from a store,
        and get_object spends ~2.5 ms of CPU on each (events, parsing; 206 packs of web:
        0.5 s), this ~1 ms; an apply of web from a store went from 2.1-2.3 s to 1.7-1.9 s
        (1.1 s from a local file)."""
        session = getattr(getattr(self.s3, "_endpoint", None), "http_session", None)
        if session is None:  # a botocore without it: the client's own way
            return self.get(key, limit)
        from botocore.awsrequest import AWSRequest
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError  # a body cut short: IncompleteRead

        for attempt in range(PACK_ATTEMPTS):
            url = self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.url.bucket, "Key": key},
                ExpiresIn=PRESIGNED_SECONDS)
            request = AWSRequest(method="GET", url=url).prepare()
            request.stream_output = True
            last = attempt + 1 == PACK_ATTEMPTS
            try:
                response = session.send(request)
                try:
                    if response.status_code in RETRIED and not last:
                        time.sleep(0.1 * 2 ** attempt)
                        continue
                    data = self._pack_body(key, limit, response, last)
                finally:
                    response.raw.release_conn()
            except (BotoCoreError, OSError, HTTPError) as e:
                if last:
                    raise self._failed(e, key) from None
                data = None
            if data is not None:
                return data
            time.sleep(0.1 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _pack_body(self, key: str, limit: int, response: Any, last: bool) -> bytes | None:
        """The body of get_pack's answer; None for one cut short that may be tried again."""
        if response.status_code == 404:
            raise NoSuchObject(self._where(key), "no such object in the store")
        if response.status_code != 200:
            raise StoreFailed(self._where(key),
                              f"the store refused: HTTP {response.status_code}")
        size = self._bounded(key, int(response.headers.get("Content-Length", -1)), limit)
        data = response.raw.read(size + 1)
        if len(data) < size and not last:
            return None
        if len(data) != size:
            raise StoreFailed(self._where(key), f"ended after {len(data)} of {size} bytes"
                              if len(data) < size else "longer than the store said")
        with self._lock:
            self.received += size
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """length bytes of the object from start (fewer if it ends before)."""
        from botocore.exceptions import BotoCoreError

        if length <= 0:
            return b""
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
