"""GETs signed without boto3 (imagefs/store/signed.py): the signature is botocore's, byte
for byte, and a SeaweedFS that checks signatures (an identity in its IAM config, no
anonymous access) serves them and refuses a wrong key in one line; credentials that only
boto3 can find (a profile) still read, through boto3."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from store_helpers import NEEDS_WEED, Weed

from imagefs.errors import UsageError
from imagefs.store.client import Store, parse_url
from imagefs.store.signed import Credentials, SignedReads, from_environment, quote

SECRET = "imagefs-signed-secret"
KEYS = ["site/packs/0123abcd", "a=b+c@d,e/x y", "prefix/ünï/~tilde_-.dot"]


@pytest.mark.parametrize("token", [None, "a-session-token"])
@pytest.mark.parametrize("key", KEYS)
def test_the_signature_is_botocores(monkeypatch: pytest.MonkeyPatch, key: str,
                                    token: str | None) -> None:
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    now = datetime(2026, 12, 4, 17, 5, 9, tzinfo=UTC)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now)
    reads = SignedReads("http://127.0.0.1:9000", "eu-west-3",
                        Credentials("AKIDEXAMPLE", SECRET, token))
    path = quote(f"/bucket/{key}")
    ours = reads.headers(path, now)
    request = AWSRequest(method="GET", url=f"http://127.0.0.1:9000{path}")
    botocore.auth.S3SigV4Auth(BotoCredentials("AKIDEXAMPLE", SECRET, token), "s3",
                              "eu-west-3").add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]
    assert ours.get("x-amz-security-token") == request.headers.get("X-Amz-Security-Token")


@pytest.mark.parametrize(("endpoint", "host"), [
    ("http://127.0.0.1:9000", "127.0.0.1:9000"), ("https://s3.example.org", "s3.example.org"),
    ("https://s3.example.org:443/", "s3.example.org"), ("http://[::1]:8333", "[::1]:8333")])
def test_the_host_signed_is_the_host_sent(endpoint: str, host: str) -> None:
    assert SignedReads(endpoint, "us-east-1", Credentials("a", "b")).host == host


def test_what_decides_signing_here(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment("http://127.0.0.1:9000") is None  # no credentials: boto3's way
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    assert from_environment(None) is None  # AWS's own endpoints: boto3 addresses them
    assert from_environment("http://h:1/behind/a/path") is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t")
    reads = from_environment(None)
    assert reads is not None and reads.credentials == Credentials("a", "b", "t")
    for bad in ("ftp://h", "http://h:port"):
        with pytest.raises(UsageError, match="--endpoint"):
            from_environment(bad)
    with pytest.raises(UsageError, match="--endpoint"):  # no URL at all: boto3 refuses it
        Store(parse_url("s3://bucket/site"), "not a url")


@pytest.fixture(scope="module")
def checking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    """A SeaweedFS whose S3 gateway knows one identity and checks every signature."""
    folder = tmp_path_factory.mktemp("weed-iam")
    config = folder / "s3.json"
    config.write_text('{"identities": [{"name": "imagefs", "credentials": [{"accessKey": '
                      f'"imagefs-test", "secretKey": "{SECRET}"}}], "actions": ["Admin", '
                      '"Read", "List", "Tagging", "Write"]}]}')
    # weed loads an IAM config only with a key to sign its STS tokens
    w = Weed(folder / "data", SECRET,
             {**os.environ, "WEED_JWT_FILER_SIGNING_KEY": "imagefs-test-signing"})
    w.args.append(f"-s3.config={config}")
    try:
        w.start()
        yield w
    finally:
        w.stop()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imagefs.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@NEEDS_WEED
def test_a_store_that_checks_signatures(checking: Weed, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("signed\n")
    image = tmp_path / "small.imagefs"
    url = "s3://signed/site=1"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "imagefs-test", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "IMAGEFS_S3_ENDPOINT": checking.endpoint}
    assert cli("capture", str(tree), str(image), "--name", "small", env=env).returncode == 0
    push = cli("push", str(image), "all", url, env=env)  # boto3 signs the writes
    assert push.returncode == 0, push.stderr
    got = cli("cat", url, "small", "/etc/motd", env=env)  # signed here
    assert (got.returncode, got.stdout) == (0, "signed\n"), got.stderr
    wrong = cli("cat", url, "small", "/etc/motd", env={**env, "AWS_SECRET_ACCESS_KEY": "x"})
    assert wrong.returncode == 8
    assert wrong.stderr.count("\n") == 1 and "SignatureDoesNotMatch" in wrong.stderr
    unknown = cli("ls", url, "small", env={**env, "AWS_ACCESS_KEY_ID": "nobody"})
    assert unknown.returncode == 8 and "InvalidAccessKeyId" in unknown.stderr

    # Credentials only boto3 finds (a profile in a credentials file): read through boto3.
    (tmp_path / "credentials").write_text(
        f"[site]\naws_access_key_id = imagefs-test\naws_secret_access_key = {SECRET}\n")
    profile = {k: v for k, v in env.items()
               if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    profile |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
                "AWS_PROFILE": "site"}
    got = cli("cat", url, "small", "/etc/motd", env=profile)
    assert (got.returncode, got.stdout) == (0, "signed\n"), got.stderr
    with pytest.MonkeyPatch.context() as m:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            m.delenv(k, raising=False)
        m.setenv("AWS_PROFILE", "site")
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
        assert Store(parse_url(url), checking.endpoint).signed is None
