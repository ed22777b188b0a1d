"""Store.get of a pack against a hostile HTTP server on loopback (no SeaweedFS needed): with
credentials in the environment a GET is signed here and sent by urllib3 (signed.py), so
what boto3 would catch is ours to catch: a body cut short, a size past the bound, 404, and
5xx answers retried, then one line."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imagefs.errors import NoSuchObject, StoreFailed
from imagefs.store.client import PACK_ATTEMPTS, Store, parse_url

BODY = b"pack bytes " * 100


class Hostile(BaseHTTPRequestHandler):
    """Answers every GET by the key's last part: ok, short, huge, gone, busy."""

    asked: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        what = self.path.split("?")[0].rsplit("/", 1)[-1]
        Hostile.asked.append(what)
        if what == "gone":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif what == "busy":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            length = {"ok": len(BODY), "short": len(BODY), "huge": 1 << 40}[what]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if what != "huge":
                self.wfile.write(BODY if what == "ok" else BODY[:100])
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "imagefs-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "imagefs-test")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Hostile.asked = []
    try:
        yield Store(parse_url("s3://bucket/site"), f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_pack_is_read_whole(store: Store) -> None:
    assert store.get("site/packs/ok", len(BODY)) == BODY
    assert store.received == len(BODY)


def test_a_body_cut_short_is_tried_again_then_named(store: Store) -> None:
    with pytest.raises(StoreFailed) as e:
        store.get("site/packs/short", len(BODY))
    assert e.value.message() == ("s3://bucket/site/packs/short: ended after 100 of 1100 bytes")
    assert Hostile.asked == ["short"] * PACK_ATTEMPTS


def test_a_size_past_the_bound_is_refused_before_the_body(store: Store) -> None:
    with pytest.raises(StoreFailed, match="more than the 1100 such an object may hold"):
        store.get("site/packs/huge", len(BODY))
    assert Hostile.asked == ["huge"]


def test_a_missing_pack_is_not_found_at_once(store: Store) -> None:
    with pytest.raises(NoSuchObject):
        store.get("site/packs/gone", len(BODY))
    assert Hostile.asked == ["gone"]


def test_a_busy_store_is_tried_again_then_named(store: Store) -> None:
    with pytest.raises(StoreFailed, match="the store refused: HTTP 503"):
        store.get("site/packs/busy", len(BODY))
    assert Hostile.asked == ["busy"] * PACK_ATTEMPTS
