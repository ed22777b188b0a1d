"""Reading objects without boto3: GETs signed with AWS Signature Version 4, sent by urllib3.

The read verbs (`apply`, `ls`, `cat`, `mount` of an s3:// index, and `pull`) only ever GET
objects by name, yet importing boto3 and making its client costs ~0.3 s of CPU before the
first byte, and each GET through the client another ~1-2 ms (its event hooks, a presigned
URL built through the service model): on an apply of web from a store on loopback, a
quarter of the time beyond a local apply.  So when the credentials and the endpoint are
plainly given (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, optionally
`AWS_SESSION_TOKEN`, and an endpoint: `--endpoint`, `IMAGEFS_S3_ENDPOINT`,
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`), GETs are signed here: the signing is a few
HMACs over a canonical request (docs.aws.amazon.com, "Signature Version 4 signing
process"), with path-style addressing as the client uses.  Anything else (a profile, an
instance role, AWS's own endpoints, every write) goes through boto3 as before
(client.Store).  tests/test_store_signed.py checks the signature against botocore's own
and against a SeaweedFS that verifies it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from imagefs.errors import UsageError, one_line

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # a GET's payload hash
UNRESERVED = "-_.~"  # besides letters and digits: never percent-encoded (SigV4's rule)
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # as botocore reads them


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


def from_environment(endpoint: str | None) -> SignedReads | None:
    """SignedReads when credentials and an endpoint are plainly given (endpoint, or the
    environment's), else None: boto3 then finds them its own way."""
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    endpoint = endpoint or next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)),
                                None)
    if not access or not secret or not endpoint:
        return None
    parts = urllib.parse.urlsplit(endpoint)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None  # a store behind a path: boto3 knows how to address it
    token = os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_SECURITY_TOKEN")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return SignedReads(endpoint, region, Credentials(access, secret, token or None))


def quote(text: str) -> str:
    """text percent-encoded as SigV4's canonical URI wants (every byte but A-Z a-z 0-9 and
    -_.~; '/' kept, as S3 keeps it)."""
    return urllib.parse.quote(text, safe="/" + UNRESERVED)


class SignedReads:
    """GETs of objects of one endpoint, signed with one set of credentials.  Thread-safe
    (urllib3's pool); a forked process makes its own pool (Store.signed)."""

    def __init__(self, endpoint: str, region: str, credentials: Credentials) -> None:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--endpoint: {one_line(endpoint)} is not an http(s):// URL")
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"--endpoint: {one_line(endpoint)}: bad port") from None
        default = 443 if parts.scheme == "https" else 80
        # The Host header urllib3 sends, which the signature covers: no default port.
        self.host = parts.hostname if port in (None, default) else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:  # an IPv6 literal keeps its brackets
            self.host = f"[{parts.hostname}]" + ("" if port in (None, default) else f":{port}")
        self.base = f"{parts.scheme}://{self.host}"
        self.region = region
        self.credentials = credentials
        self._pool: Any = None
        self._pid = 0
        self._keys: dict[str, bytes] = {}  # date -> signing key

    def pool(self) -> Any:
        if self._pool is None or self._pid != os.getpid():
            import urllib3

            self._pool = urllib3.PoolManager(
                maxsize=16, retries=False, timeout=urllib3.Timeout(connect=5, read=60))
            self._pid = os.getpid()
        return self._pool

    def get(self, bucket: str, key: str, first: int | None = None,
            length: int | None = None) -> Any:
        """The GET's response (urllib3, not yet read: the caller reads and releases it);
        bytes [first, first+length) with a range.  Raises urllib3's and the OS's errors."""
        path = quote(f"/{bucket}/{key}")
        headers = self.headers(path, datetime.now(UTC))
        if first is not None and length is not None:
            headers["Range"] = f"bytes={first}-{first + length - 1}"
        return self.pool().request("GET", self.base + path, headers=headers,
                                   preload_content=False, redirect=False)

    def headers(self, path: str, now: datetime) -> dict[str, str]:
        """The signed headers of a GET of path (already encoded) at time now."""
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        signed = {"host": self.host, "x-amz-content-sha256": EMPTY_SHA256,
                  "x-amz-date": stamp}
        if self.credentials.token:
            signed["x-amz-security-token"] = self.credentials.token
        names = ";".join(sorted(signed))
        canonical = "\n".join(["GET", path, "",
                               *(f"{k}:{signed[k].strip()}" for k in sorted(signed)), "",
                               names, EMPTY_SHA256])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(day), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        auth = (f"AWS4-HMAC-SHA256 Credential={self.credentials.access_key}/{scope}, "
                f"SignedHeaders={names}, Signature={signature}")
        return {**{k: v for k, v in signed.items() if k != "host"}, "Authorization": auth}

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = ("AWS4" + self.credentials.secret_key).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {day: key}
        return key
