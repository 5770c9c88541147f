"""CouchDB sink against a real CouchDB-compatible server (pouchdb-server, in memory, 127.0.0.1)
and, for answers pouchdb-server will not give on demand (413, 5xx, 401...), a tiny fake one.

pouchdb-server comes from npm (`make test` installs it); a missing binary FAILS these tests.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from streamtap.engine.stream import Stream
from streamtap.sinks.base import FATAL, OK, RETRY
from streamtap.sinks.couchdb import CouchdbError, CouchdbSink, encode_doc, make_doc, redact_url
from streamtap.sinks.runner import SinkRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from couchserver import CouchServer, PouchdbMissing, free_port  # noqa: E402
from pcapbuild import Conversation  # noqa: E402

T0 = 1_700_000_000.0


# --------------------------------------------------------------------------- helpers


def make_stream(i: int, client_data: bytes = b"", server_data: bytes = b"",
                v6: bool = False) -> Stream:
    client = ("2001:db8::1" if v6 else "10.0.0.1", 1024 + i % 60000)
    server = ("2001:db8::2" if v6 else "10.0.0.2", 80)
    start = T0 + i * 0.001
    return Stream(client=client, server=server, client_data=client_data,
                  server_data=server_data, close_reason="fin", gaps=[], start=start,
                  end=start + 0.5, ip_version=6 if v6 else 4, client_packets=4,
                  server_packets=4, history="ShADadFf", state="closed")


def make_streams(n: int, size: int = 300, seed: int = 0, first: int = 0) -> list[Stream]:
    rng = random.Random(seed)
    return [make_stream(i, rng.randbytes(size), rng.randbytes(size * 2), v6=i % 3 == 0)
            for i in range(first, first + n)]


def sink_for(url: str, database: str, **options: Any) -> CouchdbSink:
    return CouchdbSink("couch", {"url": url, "database": database, **options})


def attachment(server: CouchServer, db: str, doc_id: str, name: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/{db}/{doc_id}/{name}", timeout=10) as r:
        return r.read()


def _server(**kw: Any) -> CouchServer:
    try:
        return CouchServer(**kw)
    except PouchdbMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def pouch() -> Iterator[CouchServer]:
    with _server() as server:
        yield server


_db_counter = iter(range(1_000_000))


@pytest.fixture
def db() -> str:
    return f"t{next(_db_counter)}-{os.getpid()}"


# --------------------------------------------------------------------------- fake server


class FakeCouch:
    """A scripted HTTP server: `handler(method, path, body) -> (status, headers, json_body)`,
    or None to close the connection without answering.

    The default handler behaves like CouchDB for the calls the sink makes (every doc stored)."""

    def __init__(self, handler: Callable[[str, str, bytes], Any] | None = None):
        self.handler = handler or self.couch_like
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                fake.requests.append((self.command, self.path, dict(self.headers), body))
                answer = fake.handler(self.command, self.path, body)
                if answer is None:  # hang up without an answer
                    self.close_connection = True
                    return
                status, headers, payload = answer
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = _any

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    @staticmethod
    def couch_like(method: str, path: str, body: bytes) -> tuple[int, dict, Any]:
        if path.endswith("/_bulk_docs"):
            docs = json.loads(body)["docs"]
            return 201, {}, [{"ok": True, "id": d["_id"], "rev": "1-x"} for d in docs]
        if path.endswith("/_index"):
            return 200, {}, {"result": "created", "id": "_design/x", "name": "event-start"}
        return 200, {}, {"db_name": "x"}

    def bulk_requests(self) -> list[list[str]]:
        return [[d["_id"] for d in json.loads(b)["docs"]]
                for m, p, _, b in self.requests if p.endswith("/_bulk_docs")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeCouch]:
    f = FakeCouch()
    yield f
    f.close()


# --------------------------------------------------------------------------- offline encoding


def test_make_doc_layout_and_cap() -> None:
    s = make_stream(1, b"hello", bytes(range(256)) * 10)
    doc = make_doc(s, max_attachment=1000)
    assert doc["_id"] == s.id == doc["stream"]["id"]
    assert "payload" not in doc["source"] and "payload" not in doc["destination"]
    assert doc["source"]["bytes"] == 5 and doc["destination"]["bytes"] == 2560  # true totals
    assert doc["streamtap"] == {"payload_encoding": "none", "payload_truncated": True}
    atts = doc["_attachments"]
    assert set(atts) == {"client.bin", "server.bin"}
    assert atts["client.bin"]["content_type"] == "application/octet-stream"
    assert base64.b64decode(atts["client.bin"]["data"]) == b"hello"
    assert base64.b64decode(atts["server.bin"]["data"]) == (bytes(range(256)) * 10)[:1000]

    # under the cap: not truncated; empty directions have no attachment; 0 = unlimited
    doc = make_doc(make_stream(2, b"", b"x" * 5000), max_attachment=0)
    assert set(doc["_attachments"]) == {"server.bin"}
    assert doc["streamtap"]["payload_truncated"] is False
    assert "_attachments" not in make_doc(make_stream(3))


def test_encode_doc_is_make_doc_as_json() -> None:
    for s in (make_stream(1, b"a" * 3000, b"\x00\xff" * 9), make_stream(2, b"", b"x", v6=True),
              make_stream(3)):
        doc_id, raw = encode_doc(s, 1000)
        assert doc_id == s.id
        assert json.loads(raw) == make_doc(s, 1000)


def test_redact_url() -> None:
    assert redact_url("http://u:s3cret@h:5984/x") == "http://***@h:5984/x"
    assert redact_url("http://h:5984") == "http://h:5984"


# --------------------------------------------------------------------------- pouchdb-server


def test_open_creates_database_and_index(pouch: CouchServer, db: str) -> None:
    sink = sink_for(pouch.url, db)
    sink.open()
    assert pouch.get(f"/{db}")["db_name"] == db
    indexes = pouch.get(f"/{db}/_index")["indexes"]
    mine = [i for i in indexes if i["name"] == "event-start"]
    assert len(mine) == 1 and mine[0]["type"] == "json"
    assert mine[0]["def"]["fields"] == [{"event.start": "asc"}]
    assert sink.index == "created"
    sink.close()

    again = sink_for(pouch.url, db)  # a restart: database and index already there
    again.open()
    assert again.index == "exists"
    assert len([i for i in pouch.get(f"/{db}/_index")["indexes"]
                if i["name"] == "event-start"]) == 1
    again.close()


def test_parts_get_one_document_each(pouch: CouchServer, db: str, tmp_path: Path) -> None:
    # a connection emitted in parts (DESIGN "Parts"): `_id` = stream.id for part 0, then
    # `<stream.id>-<part>`; sent twice, every part is still stored exactly once
    import streamtap
    from streamtap import config as cfgmod

    conv = Conversation().handshake()
    chunks = [bytes([i]) * 1000 for i in range(20)]
    for chunk in chunks:
        conv.send("client", chunk)
    conv.send("server", b"done").close()
    conv.write(tmp_path / "long.pcap")
    cfg = cfgmod.load(None, {"reassembly": {"part_bytes": 4096}})
    parts = list(streamtap.reassemble(str(tmp_path / "long.pcap"), config=cfg))
    assert len(parts) == 5 and len({p.id for p in parts}) == 1   # 4 x 5,000 bytes, then "done"
    sid = parts[0].id
    sink = sink_for(pouch.url, db)
    sink.open()
    assert sink.write(parts).status == OK
    assert sink.write(parts).status == OK      # 409 conflicts: already stored
    want = [sid] + [f"{sid}-{n}" for n in range(1, 5)]
    assert sorted(pouch.doc_ids(db)) == sorted(want)
    got = b""
    for doc_id, p in zip(want, parts, strict=True):
        doc = pouch.get(f"/{db}/{doc_id}")
        assert (doc["stream"]["id"], doc["tcp"]["close_reason"]) == (sid, p.close_reason)
        if p.client_data:
            got += attachment(pouch, db, doc_id, "client.bin")
    assert got == b"".join(chunks)


def test_docs_stored_with_exact_attachments(pouch: CouchServer, db: str, tmp_path: Path) -> None:
    # real streams: a reassembled capture, plus built ones (binary, empty, IPv6)
    conv = Conversation(client=("10.1.0.1", 40001), server=("10.1.0.2", 8080)).handshake()
    conv.send("client", b"GET / HTTP/1.0\r\n\r\n").send("server", bytes(range(256)) * 4).close()
    conv.write(tmp_path / "one.pcap")
    import streamtap

    streams = list(streamtap.reassemble(str(tmp_path / "one.pcap")))
    assert len(streams) == 1
    streams += make_streams(30, size=700, seed=1) + [make_stream(999)]
    sink = sink_for(pouch.url, db)
    sink.open()
    res = sink.write(streams)
    assert res.status == OK, res
    assert sink.stored == len(streams)

    assert sorted(pouch.doc_ids(db)) == sorted(s.id for s in streams)
    for s in (streams[0], streams[5], streams[-1]):
        doc = pouch.get(f"/{db}/{s.id}?attachments=true")
        assert doc["stream"]["id"] == s.id
        assert doc["source"]["ip"] == s.client[0] and doc["destination"]["port"] == s.server[1]
        atts = doc.get("_attachments", {})
        for name, data in (("client.bin", s.client_data), ("server.bin", s.server_data)):
            if data:
                assert base64.b64decode(atts[name]["data"]) == data
                assert attachment(pouch, db, s.id, name) == data
            else:
                assert name not in atts
    # the index answers a Mango query on event.start
    status, found = pouch.request("POST", f"/{db}/_find", {
        "selector": {"event.start": {"$gte": "2023-11-14T22:13:20.005000Z"}},
        "fields": ["_id"], "sort": [{"event.start": "asc"}], "limit": 1000})
    assert status == 200, found
    assert len(found["docs"]) == sum(1 for s in streams if s.start >= T0 + 0.005 - 1e-9)
    sink.close()


def test_rewrite_is_a_replay_not_a_duplicate(pouch: CouchServer, db: str) -> None:
    streams = make_streams(40, seed=2)
    sink = sink_for(pouch.url, db)
    sink.open()
    assert sink.write(streams[:25]).status == OK
    res = sink.write(streams)  # 25 already there (409 conflict each) + 15 new
    assert res.status == OK, res
    assert (sink.stored, sink.replayed) == (40, 25)
    assert sink.write(streams).status == OK
    ids = pouch.doc_ids(db)
    assert len(ids) == 40 and sorted(ids) == sorted(s.id for s in streams)
    revs = [r["value"]["rev"] for r in pouch.get(f"/{db}/_all_docs")["rows"]
            if not r["id"].startswith("_design/")]
    assert all(rev.startswith("1-") for rev in revs)  # each written once, never updated


def test_attachment_cap_on_server(pouch: CouchServer, db: str) -> None:
    s = make_stream(7, b"a" * 5000, b"b" * 10)
    sink = sink_for(pouch.url, db, max_attachment=1024)
    sink.open()
    assert sink.write([s]).status == OK
    doc = pouch.get(f"/{db}/{s.id}")
    assert doc["streamtap"]["payload_truncated"] is True
    assert doc["source"]["bytes"] == 5000
    assert attachment(pouch, db, s.id, "client.bin") == b"a" * 1024
    assert attachment(pouch, db, s.id, "server.bin") == b"b" * 10


def test_batch_split_by_docs_and_bytes(fake: FakeCouch) -> None:
    streams = make_streams(20, size=1000, seed=3)
    sink = sink_for(fake.url, "db", batch_docs=7)
    assert sink.write(streams).status == OK
    assert [len(b) for b in fake.bulk_requests()] == [7, 7, 6]
    fake.requests.clear()
    sink = sink_for(fake.url, "db", batch_bytes=10_000)  # ~4.3 kB per doc: 2 a request
    assert sink.write(streams).status == OK
    sizes = [len(b) for b in fake.bulk_requests()]
    assert sum(sizes) == 20 and max(sizes) == 2
    assert [i for b in fake.bulk_requests() for i in b] == [s.id for s in streams]


def test_413_on_pouchdb_splits(tmp_path: Path) -> None:
    """pouchdb-server's own request size limit (its /_config, test set-up only)."""
    streams = make_streams(16, size=1000, seed=4)
    one = len(json.dumps(make_doc(streams[0])))
    with _server() as server:
        status, _ = server.request("PUT", "/_config/couchdb/max_document_size",
                                   str(one * 3 + 100))
        assert status == 200
        sink = sink_for(server.url, "split")
        sink.open()
        res = sink.write(streams)
        assert res.status == OK, res
        assert sorted(server.doc_ids("split")) == sorted(s.id for s in streams)
        big = make_stream(500, b"z" * 20_000)
        res = sink.write([big])
        assert res.status == FATAL and big.id in (res.error or "") and "413" in (res.error or "")


def test_413_split_recursively_fake() -> None:
    limit = 12_000

    def handler(method: str, path: str, body: bytes) -> tuple[int, dict, Any]:
        if path.endswith("/_bulk_docs") and len(body) > limit:
            return 413, {}, {"error": "too_large", "reason": "the request entity is too large"}
        return FakeCouch.couch_like(method, path, body)

    fake = FakeCouch(handler)
    try:
        streams = make_streams(16, size=1000, seed=5)  # ~4.3 kB each: 2 fit
        huge = make_stream(400, b"q" * 30_000)
        sink = sink_for(fake.url, "db")
        res = sink.write(streams[:8] + [huge] + streams[8:])
        assert res.status == FATAL
        assert huge.id in (res.error or "") and "413" in (res.error or "")
        assert "1 of 17" in (res.error or "")
        stored = [i for m, p, _, b in fake.requests if p.endswith("/_bulk_docs")
                  and len(b) <= limit for i in (d["_id"] for d in json.loads(b)["docs"])]
        assert sorted(stored) == sorted(s.id for s in streams)  # the others all went through
        assert sink.stored == 16 and sink.rejected == 1
    finally:
        fake.close()


@pytest.mark.parametrize(("status", "headers", "after"), [
    (500, {}, None), (503, {"Retry-After": "7"}, 7.0), (429, {"Retry-After": "2"}, 2.0),
    (408, {}, None), (502, {"Retry-After": "soon"}, None),
])
def test_transient_answers_retry(status: int, headers: dict, after: float | None) -> None:
    fake = FakeCouch(lambda m, p, b: (status, headers, {"error": "x", "reason": "busy"}))
    try:
        res = sink_for(fake.url, "db").write(make_streams(3))
        assert res.status == RETRY and res.after == after
        assert str(status) in (res.error or "")
    finally:
        fake.close()


def test_retry_after_http_date() -> None:
    from email.utils import formatdate

    when = formatdate(time.time() + 30, usegmt=True)
    fake = FakeCouch(lambda m, p, b: (503, {"Retry-After": when}, {"error": "x"}))
    try:
        res = sink_for(fake.url, "db").write(make_streams(1))
        assert res.status == RETRY and res.after is not None and 25 <= res.after <= 31
    finally:
        fake.close()


SECRET = "pa55-W0rd!x"
USER = "streamtap-admin"


@pytest.mark.parametrize(("status", "reason"), [
    (401, "Name or password is incorrect."), (403, "You are not allowed to access this db."),
    (400, "invalid_json"), (404, "Database does not exist."),
])
def test_client_errors_are_fatal_without_credentials(status: int, reason: str) -> None:
    fake = FakeCouch(lambda m, p, b: (status, {}, {"error": "unauthorized", "reason": reason}))
    try:
        sink = sink_for(fake.url.replace("://", f"://{USER}:{SECRET}@"), "db")
        res = sink.write(make_streams(2))
        assert res.status == FATAL and reason in (res.error or "") and str(status) in res.error
        text = repr(res) + json.dumps(sink.health())
        assert SECRET not in text and USER not in text
        assert sink.health()["last_status"] == status
    finally:
        fake.close()


def test_per_doc_errors(fake: FakeCouch) -> None:
    streams = make_streams(4)

    def handler(method: str, path: str, body: bytes) -> tuple[int, dict, Any]:
        ids = [d["_id"] for d in json.loads(body)["docs"]]
        return 201, {}, [
            {"ok": True, "id": ids[0], "rev": "1-a"},
            {"id": ids[1], "error": "conflict", "reason": "Document update conflict."},
            {"id": ids[2], "error": "forbidden", "reason": "only admins"},
            {"id": ids[3], "rev": "1-b"},
        ]

    fake.handler = handler
    sink = sink_for(fake.url, "db")
    res = sink.write(streams)
    assert res.status == FATAL
    assert streams[2].id in (res.error or "") and "forbidden" in (res.error or "")
    assert streams[1].id not in (res.error or "") and streams[0].id not in (res.error or "")
    assert (sink.stored, sink.replayed, sink.rejected) == (2, 1, 1)

    fake.handler = lambda m, p, b: (201, {}, [])  # an answer missing docs: send again
    assert sink.write(streams).status == RETRY


def test_dropped_connection_resent_once(fake: FakeCouch) -> None:
    drops = [1]

    def handler(method: str, path: str, body: bytes) -> Any:
        if drops[0] > 0:
            drops[0] -= 1
            return None
        return FakeCouch.couch_like(method, path, body)

    fake.handler = handler
    sink = sink_for(fake.url, "db")
    assert sink.write(make_streams(3)).status == OK  # resent at once on a new connection
    assert len(fake.requests) == 2 and sink.stored == 3
    drops[0] = 2
    res = sink.write(make_streams(3))  # dropped twice: the runner's backoff takes over
    assert res.status == RETRY and "ProtocolError" in (res.error or "")


def test_not_a_couchdb_answer_is_fatal(fake: FakeCouch) -> None:
    fake.handler = lambda m, p, b: (200, {}, {"hello": "proxy"})
    res = sink_for(fake.url, "db").write(make_streams(2))
    assert res.status == FATAL and "not a CouchDB answer" in (res.error or "")


@pytest.mark.parametrize("where", ["options", "url", "env"])
def test_credentials_sent_never_shown(where: str, fake: FakeCouch,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url, options = fake.url, {}
    if where == "options":
        options = {"username": USER, "password": SECRET}
    elif where == "url":
        url = fake.url.replace("://", f"://{USER}:{SECRET.replace('!', '%21')}@")
    else:
        monkeypatch.setenv("STREAMTAP_COUCHDB_USER", USER)
        monkeypatch.setenv("STREAMTAP_COUCHDB_PASSWORD", SECRET)
    sink = sink_for(url, "db", **options)
    sink.open()
    assert sink.write(make_streams(2)).status == OK
    expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    assert {h.get("Authorization") for _, _, h, _ in fake.requests} == {expected}
    health = json.dumps(sink.health())
    assert SECRET not in health and USER not in health and "%21" not in health
    assert sink.health()["url"].startswith("http://")
    # a transport failure's text neither
    fake.close()
    res = sink.write(make_streams(1))
    assert res.status == RETRY
    text = (res.error or "") + json.dumps(sink.health())
    assert SECRET not in text and USER not in text and expected not in text


def test_open_failures() -> None:
    port = free_port()  # nobody listens: connection refused
    with pytest.raises(OSError):
        sink_for(f"http://127.0.0.1:{port}", "db").open()
    fake = FakeCouch(lambda m, p, b: (401, {}, {"error": "unauthorized", "reason": "nope"}))
    try:
        with pytest.raises(CouchdbError, match="nope"):
            sink_for(fake.url, "db").open()
        fake.handler = lambda m, p, b: (503, {}, {"error": "unavailable"})
        with pytest.raises(OSError):
            sink_for(fake.url, "db").open()
        # database missing: created (PUT); index refused (not an admin): logged, not fatal
        calls: list[str] = []

        def handler(method: str, path: str, body: bytes) -> tuple[int, dict, Any]:
            calls.append(f"{method} {path}")
            if method == "GET":
                return 404, {}, {"error": "not_found", "reason": "Database does not exist."}
            if method == "PUT":
                return 201, {}, {"ok": True}
            return 403, {}, {"error": "forbidden", "reason": "admins only"}

        fake.handler = handler
        sink = sink_for(fake.url, "my/db")
        sink.open()
        assert calls == ["GET /my%2Fdb", "PUT /my%2Fdb", "POST /my%2Fdb/_index"]
        assert (sink.index or "").startswith("unavailable")
    finally:
        fake.close()


# --------------------------------------------------------------------------- the URL names the db


@pytest.mark.parametrize(("suffix", "database", "db_path", "name"), [
    # DESIGN "Pinned details": without database, the URL's last path segment is the database
    ("/streams", None, "/streams", "streams"),
    ("/streams/", None, "/streams", "streams"),
    ("/my%2Fdb", None, "/my%2Fdb", "my/db"),
    ("/couch/streams", None, "/couch/streams", "streams"),
    ("/couch/streams/", None, "/couch/streams", "streams"),
    # an explicit database keeps the whole path as the base
    ("/couch", "streams", "/couch/streams", "streams"),
    ("/couch/", "streams", "/couch/streams", "streams"),
    # no path segment, no database: the old default name
    ("", None, "/streamtap", "streamtap"),
    ("/", None, "/streamtap", "streamtap"),
])
def test_url_names_the_database(fake: FakeCouch, suffix: str, database: str | None,
                                db_path: str, name: str) -> None:
    options: dict[str, Any] = {"url": fake.url + suffix}
    if database is not None:
        options["database"] = database
    sink = CouchdbSink("couch", options)
    sink.open()
    assert sink.write(make_streams(2)).status == OK
    assert [f"{m} {p}" for m, p, _, _ in fake.requests] == [
        f"GET {db_path}", f"POST {db_path}/_index", f"POST {db_path}/_bulk_docs"]
    assert sink.database == name
    assert sink.health()["location"] == fake.url + db_path
    sink.close()


def test_url_names_the_database_on_pouchdb(pouch: CouchServer, db: str) -> None:
    """The issue's case: `.../streams` used to be taken as a proxy prefix (PUT /streams/streamtap,
    HTTP 404 no_db_file)."""
    first, second = make_streams(3, seed=11), make_streams(3, seed=12, first=50)
    for url, batch in ((f"{pouch.url}/{db}", first), (f"{pouch.url}/{db}/", second)):
        sink = CouchdbSink("couch", {"url": url})
        sink.open()
        assert sink.write(batch).status == OK
        sink.close()
    assert sorted(pouch.doc_ids(db)) == sorted(s.id for s in first + second)
    assert pouch.request("GET", f"/{db}/streamtap")[0] == 404  # no nested database


def test_credentials_in_a_database_url_work_and_stay_masked(db: str) -> None:
    with _server(admins={USER: SECRET}) as server:
        auth = server.url.replace("://", f"://{USER}:{quote(SECRET, safe='')}@")
        sink = CouchdbSink("couch", {"url": f"{auth}/{db}"})
        sink.open()
        assert sink.write(make_streams(2, seed=13)).status == OK
        token = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        status, rows = server.request("GET", f"/{db}/_all_docs",
                                      headers={"Authorization": f"Basic {token}"})
        assert status == 200 and len([r for r in rows["rows"]
                                      if not r["id"].startswith("_design/")]) == 2
        health = json.dumps(sink.health())
        assert SECRET not in health and USER not in health and token not in health
        assert sink.health()["location"] == f"{server.url}/{db}"
        sink.close()

        wrong = "not-the-pa55word"
        bad = CouchdbSink("couch", {"url": f"{server.url.replace('://', f'://{USER}:{wrong}@')}"
                                           f"/{db}"})
        with pytest.raises(CouchdbError) as info:
            bad.open()
        text = str(info.value)
        assert text == (f"{server.url}/{db}: HTTP 401 unauthorized: "
                        "Name or password is incorrect.")
        assert wrong not in text + json.dumps(bad.health())


def test_runner_logs_one_line_per_failed_open(caplog: pytest.LogCaptureFixture) -> None:
    """The daemon's path: a sink that cannot open (401, then unreachable) is one log line per
    failure episode, no traceback; the records wait (queue/spool) and are stored once it opens."""
    from streamtap.sinks.runner import SinkRunner

    answers = [(401, {}, {"error": "unauthorized", "reason": "Name or password is incorrect."})]
    fake = FakeCouch(lambda m, p, b: answers[0] if answers else FakeCouch.couch_like(m, p, b))
    secret_url = fake.url.replace("://", f"://{USER}:{quote(SECRET, safe='')}@") + "/streams"
    sink = CouchdbSink("archive", {"url": secret_url, "timeout": 2})
    tries: list[float] = []

    def sleep(delay: float) -> None:
        tries.append(delay)
        if len(tries) == 2:
            answers.clear()  # the operator fixed the credentials

    runner = SinkRunner(sink, spool_dir=None, batch_age=0.01, rng=random.Random(0), sleep=sleep)
    streams = make_streams(3, seed=14)
    try:
        with caplog.at_level(logging.INFO, logger="streamtap"):
            runner.submit(streams)
            runner.start()
            deadline = time.monotonic() + 10
            while sink.stored < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            runner.stop(5)
    finally:
        fake.close()
    assert sink.stored == 3 and runner.stats()["records"]["ok"] == 3
    mine = [r for r in caplog.records if "archive" in r.getMessage()]
    # one line per failure episode (the same answer twice), one when it answers again
    assert [r.getMessage().split(":")[0] for r in mine] == ["sink archive"] * 2, mine
    assert "answering again after 2 failed attempt(s)" in mine[1].getMessage()
    mine = mine[:1]
    for r in mine:
        line = r.getMessage()
        assert r.exc_info is None and "\n" not in line
        assert "HTTP 401 unauthorized: Name or password is incorrect." in line
        assert f"{fake.url}/streams" in line and SECRET not in line and USER not in line


def test_outage_then_recovery_stores_each_doc_once(tmp_path: Path) -> None:
    first, second = make_streams(30, seed=6), make_streams(30, seed=7, first=100)
    with _server(data_dir=tmp_path / "data") as server:
        sink = sink_for(server.url, "outage", timeout=5)
        sink.open()
        assert sink.write(first).status == OK
        server.stop()
        res = sink.write(second)
        assert res.status == RETRY, res
        assert "refused" in (res.error or "").lower()
        assert sink.health()["last_status"] is None
        server.start()  # same port, same data
        res = sink.write(second)  # the runner's retry of the same batch
        assert res.status == OK, res
        assert sink.write(first + second).status == OK  # a spool replay of everything
        ids = server.doc_ids("outage")
        assert len(ids) == 60 and sorted(ids) == sorted(s.id for s in first + second)
        sink.close()


def test_runner_end_to_end_outage(tmp_path: Path) -> None:
    streams = make_streams(200, size=200, seed=8)
    with _server(data_dir=tmp_path / "data") as server:
        sink = sink_for(server.url, "e2e", timeout=5)
        runner = SinkRunner(
            sink, spool_dir=str(tmp_path / "spool"), queue_max=40, batch_records=25,
            batch_age=0.05, backoff_base=0.05, backoff_cap=0.2, rng=random.Random(1))
        runner.start()
        for k in range(0, 60, 10):
            runner.submit(streams[k:k + 10])
        time.sleep(0.3)
        server.stop()
        for k in range(60, 150, 10):  # while down: queued, then spooled
            runner.submit(streams[k:k + 10])
            time.sleep(0.02)
        time.sleep(0.3)
        server.start()
        for k in range(150, 200, 10):
            runner.submit(streams[k:k + 10])
        runner.stop(timeout=20)
        stats = runner.stats()
        ids = server.doc_ids("e2e")
        assert len(ids) == 200 and sorted(ids) == sorted(s.id for s in streams), stats
        assert stats["records"]["dropped"] == 0 and stats["records"]["failed"] == 0, stats
        assert stats["records"]["retried"] > 0, stats  # the outage was seen
