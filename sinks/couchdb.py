"""CouchDB sink: stream records as documents, payloads as attachments, through `_bulk_docs`.

Talks the CouchDB 3.x HTTP API (and the subset pouchdb-server implements, which the tests run
against). One document per stream:

- `_id` = `stream.id` (deterministic: the same capture gives the same ids), so a batch sent again
  after a lost response, a spool replay or a re-ingested pcap gets `409 conflict` for what is
  already stored, and that counts as stored: every stream lands exactly once. A long connection
  emitted in parts (DESIGN "Parts") has one document per part: part 0 (and a stream emitted
  whole) keeps `_id` = `stream.id`, part N > 0 gets `<stream.id>-<N>` (`doc_id`), so ids stay
  unique and deterministic and a stream that never needed parts keeps the id it always had;
- the body is the stream record (`streamtap.engine.stream.to_record`) with `payload_encoding: none`;
  `streamtap.payload_truncated` says whether an attachment was cut at `max_attachment`;
- `_attachments`: `client.bin` / `server.bin` (application/octet-stream), inline base64, each
  direction capped at `max_attachment` bytes; an empty direction has no attachment.

`open()` creates the database if missing and a Mango index `event-start` on `event.start`.

The URL names the database the way PouchDB, the CouchDB replicator and CouchDB clients read it
(DESIGN "Pinned details": CouchDB URL): `http://127.0.0.1:5984/streams` is the database
`streams` on the server `http://127.0.0.1:5984`, `http://h/couch/streams` the database `streams`
behind a proxy prefix `/couch`. When the `database` option is set, the whole URL path is the
server's base path instead. A URL without a path and without `database` uses `streamtap`.

`write(batch)` maps the server's answers onto the runner's three outcomes (STYLE F2):

| answer                                   | result                                          |
|------------------------------------------|-------------------------------------------------|
| per doc `ok`, or `error: conflict` (409) | stored (a conflict is a replay)                 |
| per doc, any other error                 | fatal for those docs (ids and reasons reported) |
| HTTP 413                                 | split in halves, recursively; one doc -> fatal  |
| HTTP 408, 429, 5xx, connection errors    | retry (after `Retry-After` when given)          |
| HTTP 400, 401, 403, other 4xx            | fatal, with the server's reason                 |

A retry means the runner sends the whole batch again later; what was already stored then comes
back as conflicts. Credentials (options, URL userinfo, or the environment variables
`STREAMTAP_COUCHDB_USER` / `STREAMTAP_COUCHDB_PASSWORD`) travel only in the Authorization
header and never appear in `health()`, logs or error texts.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NameResolutionError, NewConnectionError, ProtocolError

from streamtap.config.schema import ConfigError, redact_url, setting
from streamtap.engine.stream import Stream, to_record

from .base import Result, Sink, SinkError

__all__ = ["CouchdbError", "CouchdbSink", "encode_doc", "make_doc", "redact_url"]

log = logging.getLogger(__name__)

MIB = 1024**2

ENV_USER = "STREAMTAP_COUCHDB_USER"
ENV_PASSWORD = "STREAMTAP_COUCHDB_PASSWORD"

INDEX_NAME = "event-start"
INDEX_FIELD = "event.start"
ATT_CLIENT = "client.bin"
ATT_SERVER = "server.bin"
OCTET_STREAM = "application/octet-stream"

# HTTP statuses (RFC 9110) with a meaning of their own here.
HTTP_REQUEST_TIMEOUT = 408
HTTP_PRECONDITION_FAILED = 412  # PUT /{db}: the database exists
HTTP_PAYLOAD_TOO_LARGE = 413
HTTP_TOO_MANY_REQUESTS = 429
HTTP_NOT_FOUND = 404
RETRYABLE_4XX = (HTTP_REQUEST_TIMEOUT, HTTP_TOO_MANY_REQUESTS)

CONFLICT = "conflict"  # the per-document error of a 409: this _id is already stored


class CouchdbError(SinkError):
    """A permanent failure (bad credentials, forbidden, bad request): retrying will not help.

    `open()` raises it for 4xx answers; connection failures and 5xx raise `OSError` instead.
    Either text is `DATABASE-URL: answer`, credentials masked."""


# --------------------------------------------------------------------------- encoding (offline)


def _doc_parts(s: Stream, cap: int | None) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The document without `_attachments`, and the attachments as (name, base64 bytes)."""
    doc = to_record(s, payload="none")
    truncated = False
    atts: list[tuple[str, bytes]] = []
    for name, data in ((ATT_CLIENT, s.client_data), (ATT_SERVER, s.server_data)):
        if not data:
            continue
        if cap is not None and len(data) > cap:
            data = data[:cap]
            truncated = True
        atts.append((name, base64.b64encode(data)))
    doc["streamtap"]["payload_truncated"] = truncated
    doc["_id"] = doc_id(s, doc["stream"]["id"])
    return doc, atts


def doc_id(s: Stream, sid: str | None = None) -> str:
    """The document `_id` of `s`: its stream id, with `-<part>` for parts after the first."""
    sid = sid if sid is not None else s.id
    part = getattr(s, "part", 0)
    return f"{sid}-{part}" if part else sid


def make_doc(s: Stream, max_attachment: int | None = 1 * MIB) -> dict[str, Any]:
    """The CouchDB document of `s` (no network: F1's test formatter).

    `max_attachment` caps each direction's attachment; None or 0 = unlimited.
    """
    doc, atts = _doc_parts(s, max_attachment or None)
    if atts:
        doc["_attachments"] = {
            name: {"content_type": OCTET_STREAM, "data": b64.decode("ascii")}
            for name, b64 in atts
        }
    return doc


def encode_doc(s: Stream, max_attachment: int | None = 1 * MIB) -> tuple[str, bytes]:
    """(`_id`, the JSON bytes of `make_doc(s, max_attachment)`).

    The base64 attachments are spliced in after encoding the (small) rest of the document:
    JSON never escapes base64, and scanning megabytes of it in `json.dumps` was most of the
    encoding time."""
    doc, atts = _doc_parts(s, max_attachment or None)
    head = json.dumps(doc, separators=(",", ":")).encode("ascii")
    if not atts:
        return doc["_id"], head
    parts = [head[:-1], b',"_attachments":{']
    for i, (name, b64) in enumerate(atts):
        parts += [b',' if i else b'', b'"', name.encode("ascii"),
                  b'":{"content_type":"' + OCTET_STREAM.encode("ascii") + b'","data":"', b64,
                  b'"}']
    parts.append(b"}}")
    return doc["_id"], b"".join(parts)


def _bulk_body(encoded: Sequence[bytes]) -> bytes:
    return b'{"docs":[' + b",".join(encoded) + b"]}"


# --------------------------------------------------------------------------- URL and credentials


def _split_url(url: str) -> tuple[str, str | None, str | None]:
    """(scheme://host:port, user, password) of `url`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {redact_url(url)!r}")
    host = parts.netloc.rpartition("@")[2]
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return f"{parts.scheme}://{host}", user, password


# urllib3 prefixes its messages with the connection's repr, e.g. "HTTPConnection(host='h',
# port=1): " or "<urllib3.connection.HTTPConnection object at 0x7f...>: ": noise in a log line.
_CONN_REPR = re.compile(r"\w+\(host=[^)]*\):\s*|<[^<>]* object at 0x[0-9a-f]+>:?\s*")


def _transport_reason(exc: Urllib3Error) -> str:
    """What went wrong on the wire, in one line: `cannot connect: Connection refused`."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, NameResolutionError | NewConnectionError):
        what = ("cannot resolve the host" if isinstance(exc, NameResolutionError)
                else "cannot connect")
        if isinstance(cause, OSError) and cause.strerror:
            return f"{what}: {cause.strerror}"
        return f"{what}: {_CONN_REPR.sub('', str(exc))}"
    return f"{type(exc).__name__}: {_CONN_REPR.sub('', str(exc))}"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Response:
    __slots__ = ("status", "data", "headers")

    def __init__(self, status: int, data: bytes, headers: Any) -> None:
        self.status = status
        self.data = data
        self.headers = headers

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except ValueError:
            return None

    def reason(self) -> str:
        """`error: reason` from a CouchDB error body, else the start of the body."""
        body = self.json()
        if isinstance(body, dict) and ("error" in body or "reason" in body):
            return f"{body.get('error', '')}: {body.get('reason', '')}".strip(": ")
        return self.data[:200].decode("utf-8", "replace").strip()


# --------------------------------------------------------------------------- the sink


COUCHDB_DEFAULT_DATABASE = "streamtap"


def couchdb_location(url: str, database: str | None) -> tuple[str, str]:
    """(base path, database) a CouchDB sink talks to (DESIGN "Pinned details": CouchDB URL).

    With ``database`` unset, the URL's last path segment (percent-decoded) is the database and
    what precedes it the server's base path, as PouchDB and the CouchDB replicator read such a
    URL: ``http://h/couch/streams/`` -> ("/couch", "streams"). A URL without a path segment
    keeps the default database ``streamtap``. An explicit ``database`` keeps the whole path as
    the base (a reverse proxy's prefix). The base path has no trailing slash and stays
    percent-encoded, as it goes on the wire.
    """
    path = urlsplit(url).path.rstrip("/")
    if database is not None:
        return path, database
    base, _, last = path.rpartition("/")
    if not last:
        return "", COUCHDB_DEFAULT_DATABASE
    return base, unquote(last)


def _http_url(value: str, path: str) -> str:
    if not re.match(r"https?://[^/\s]+", value):
        raise ConfigError(f"expected an http:// or https:// URL, got {redact_url(value)!r}", path)
    return value


def _couchdb_name(value: str | None, path: str) -> str | None:
    # CouchDB's rule for database names.
    if value is not None and not re.fullmatch(r"[a-z][a-z0-9_$()+/-]*", value):
        raise ConfigError(
            f"expected a CouchDB database name (lowercase letter, then a-z 0-9 _$()+-/), "
            f"got {value!r}",
            path,
        )
    return value


@dataclass(frozen=True)
class CouchdbOptions:
    """CouchDB 3.x (or a compatible server) over HTTP, _bulk_docs batches."""

    url: str = setting(
        check=_http_url,
        secret=True,
        help="Database URL, e.g. http://127.0.0.1:5984/streams (required): without database, "
        "the last path segment names the database and what precedes it is the server's base "
        "path. Credentials (http://user:password@host) are masked in logs and --check-config.",
    )
    database: str | None = setting(
        None,
        check=_couchdb_name,
        help="Database name; null = the URL's last path segment (streamtap if the URL has no "
        "path). When set, the whole URL path is the server's base path.",
    )
    username: str | None = setting(
        None, help="null = from the URL, else $STREAMTAP_COUCHDB_USER (never logged)."
    )
    password: str | None = setting(
        None, secret=True,
        help="null = from the URL, else $STREAMTAP_COUCHDB_PASSWORD (never logged; prefer "
        "the environment, e.g. the unit's EnvironmentFile)."
    )
    timeout: float = setting(30.0, unit="duration", positive=True, help="HTTP request timeout.")
    max_attachment: int = setting(
        1 * MIB, unit="size", help="Payload bytes attached per direction; 0 = unlimited."
    )
    batch_docs: int = setting(500, positive=True, help="Documents per _bulk_docs request.")
    batch_bytes: int = setting(4 * MIB, unit="size", positive=True,
                               help="Bytes per _bulk_docs request.")


def _couchdb_url_database(options: CouchdbOptions, key_path: str) -> None:
    # A database named by the URL must be a valid name too: say so now (exit 2), not as an
    # HTTP 400 from the server once capture has started.
    if options.database is not None:
        return
    _base, database = couchdb_location(options.url, None)
    try:
        _couchdb_name(database, f"{key_path}.url")
    except ConfigError as e:
        raise ConfigError(f"the URL's last path segment names the database: {e.message}",
                          e.key_path) from None


class CouchdbSink(Sink):
    """Stores streams in a CouchDB database (see the module docstring).

    Options (declared with their defaults in `CouchdbOptions`): `url`, `database`, `username`,
    `password`, `timeout` (seconds, connect and read), `max_attachment` (bytes per direction,
    0 = unlimited), `batch_docs` / `batch_bytes` (one `_bulk_docs` request carries at most this
    many documents / about this many bytes; a bigger batch is split here).
    """

    type = "couchdb"
    options_class = CouchdbOptions
    options_check = staticmethod(_couchdb_url_database)
    spec_key = "url"

    def __init__(
        self, name: str, options: Mapping[str, Any], *, interface: str | None = None,
        state_dir: str | None = None,
    ) -> None:
        o: CouchdbOptions = self.parse_options(options)
        super().__init__(name, dataclasses.asdict(o), interface=interface, state_dir=state_dir)
        self.url = o.url
        self.timeout = o.timeout
        self.max_attachment = o.max_attachment or None
        self.batch_docs = o.batch_docs
        self.batch_bytes = o.batch_bytes

        self._origin, url_user, url_password = _split_url(self.url)
        base_path, database = couchdb_location(self.url, o.database)
        self.database = database or COUCHDB_DEFAULT_DATABASE
        user = o.username or url_user or os.environ.get(ENV_USER) or None
        password = o.password or url_password or os.environ.get(ENV_PASSWORD) or None
        self._secrets = [x for x in (password, user) if x]
        self._db_path = f"{base_path}/{quote(self.database, safe='')}"
        # where errors say they went: the database's URL, credentials left out
        self.location = redact_url(self._origin + self._db_path)
        self._headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
            self._secrets.append(token)
        self._pool: urllib3.HTTPConnectionPool | None = None

        self.last_status: int | None = None
        self.last_error: str | None = None
        self.index: str | None = None  # "created" | "exists" | "unavailable: ..."
        self.stored = 0  # docs the server accepted now
        self.replayed = 0  # docs that were already there (409 conflict)
        self.rejected = 0  # docs refused for good (fatal)
        self.requests = 0

    # ----------------------------------------------------------------- HTTP

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if len(secret) >= 3:  # a 1-2 character secret would garble every message
                text = text.replace(secret, "***")
        return text

    def _connection(self) -> urllib3.HTTPConnectionPool:
        if self._pool is None:
            self._pool = urllib3.connection_from_url(
                self._origin,
                maxsize=2,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
                retries=False,  # the runner owns retries and backoff (STYLE F3)
            )
        return self._pool

    def _request(self, method: str, path: str, body: bytes | None = None) -> _Response:
        """One HTTP exchange. Raises `ConnectionError` (an OSError) for transport failures.

        A request that fails with a dropped connection (`ProtocolError`: the server closed a
        pooled keep-alive connection as it was reused; Node's idle timeout is 5 s) is sent once
        more on a new connection. That is safe because every request here is idempotent
        (`_bulk_docs` with deterministic ids included). Timeouts and refused connections are
        not resent: the runner backs off (STYLE F3)."""
        pool = self._connection()
        error: Urllib3Error | None = None
        for _attempt in range(2):
            self.requests += 1
            try:
                r = pool.urlopen(method, path, body=body, headers=self._headers, retries=False,
                                 redirect=False, preload_content=True)
            except ProtocolError as exc:
                error = exc
                continue
            except Urllib3Error as exc:
                error = exc
                break
            self.last_status = r.status
            return _Response(r.status, r.data, r.headers)
        self.last_status = None
        assert error is not None
        self.last_error = self._redact(_transport_reason(error))
        raise ConnectionError(f"{self.location}: {self.last_error}")

    def _fail(self, what: str, r: _Response) -> str:
        self.last_error = self._redact(f"{what}: HTTP {r.status} {r.reason()}")
        return self.last_error

    # ----------------------------------------------------------------- contract

    def open(self) -> None:
        """Create the database (if missing) and the `event.start` index.

        Raises OSError (connection failure, 5xx, 408/429: the runner retries) or
        `CouchdbError` (other 4xx: credentials or permissions are wrong)."""
        r = self._request("GET", self._db_path)
        if r.status == HTTP_NOT_FOUND:
            r = self._request("PUT", self._db_path)
            if r.status == HTTP_PRECONDITION_FAILED:  # created meanwhile by someone else
                r = _Response(200, b"", {})
        if not 200 <= r.status < 300:
            message = self._fail(self.location, r)
            if r.status >= 500 or r.status in RETRYABLE_4XX:
                raise ConnectionError(message)
            raise CouchdbError(message)
        self._ensure_index()
        self.last_error = None

    def _ensure_index(self) -> None:
        """The Mango index on `event.start`. Failing to create it (e.g. a member, not an admin,
        of the database) is logged, not fatal: documents can still be stored."""
        body = {"index": {"fields": [INDEX_FIELD]}, "name": INDEX_NAME, "type": "json"}
        r = self._request("POST", f"{self._db_path}/_index", json.dumps(body).encode())
        if 200 <= r.status < 300:
            result = r.json()
            self.index = result.get("result", "created") if isinstance(result, dict) else "created"
            return
        if r.status >= 500 or r.status in RETRYABLE_4XX:
            raise ConnectionError(self._fail("index", r))
        self.index = "unavailable: " + self._redact(f"HTTP {r.status} {r.reason()}")
        log.warning("couchdb sink %s: cannot create index %s: %s", self.name, INDEX_NAME,
                    self.index)

    def write(self, batch: Sequence[Stream]) -> Result:
        if not batch:
            return Result.ok()
        pairs = [encode_doc(s, self.max_attachment) for s in batch]
        ids = [doc_id for doc_id, _ in pairs]
        encoded = [doc for _, doc in pairs]
        del pairs
        rejected: list[str] = []
        for lo, hi in self._chunks(encoded):
            retry = self._post(encoded[lo:hi], ids[lo:hi], rejected)
            if retry is not None:
                return retry
        if rejected:
            self.rejected += len(rejected)
            shown = "; ".join(rejected[:5]) + ("; ..." if len(rejected) > 5 else "")
            self.last_error = self._redact(
                f"{len(rejected)} of {len(batch)} documents rejected: {shown}")
            return Result.fatal(self.last_error)
        self.last_error = None
        return Result.ok()

    def _chunks(self, encoded: Sequence[bytes]) -> Iterator[tuple[int, int]]:
        """[lo, hi) ranges of at most `batch_docs` docs and about `batch_bytes` bytes (a doc
        bigger than that goes alone)."""
        lo, size = 0, 0
        for i, doc in enumerate(encoded):
            if i > lo and (i - lo >= self.batch_docs or size + len(doc) > self.batch_bytes):
                yield lo, i
                lo, size = i, 0
            size += len(doc) + 1
        yield lo, len(encoded)

    def _post(
        self, docs: Sequence[bytes], ids: Sequence[str], rejected: list[str]
    ) -> Result | None:
        """POST docs to _bulk_docs; per-doc failures are appended to `rejected`.

        Returns a retry/fatal Result for the whole call, or None when every doc was either
        stored or recorded in `rejected`."""
        try:
            r = self._request("POST", f"{self._db_path}/_bulk_docs", _bulk_body(docs))
        except ConnectionError as exc:
            return Result.retry(None, str(exc))
        if r.status == HTTP_PAYLOAD_TOO_LARGE:
            if len(docs) == 1:
                rejected.append(f"{ids[0]}: HTTP 413 {r.reason()}")
                return None
            mid = len(docs) // 2
            return (self._post(docs[:mid], ids[:mid], rejected)
                    or self._post(docs[mid:], ids[mid:], rejected))
        if r.status >= 500 or r.status in RETRYABLE_4XX:
            return Result.retry(_retry_after(r.headers.get("Retry-After")),
                                self._fail("_bulk_docs", r))
        results = r.json()
        if not isinstance(results, list):
            # other 4xx, 3xx (redirects are not followed), or a 2xx that is not CouchDB's
            # per-document list (a wrong URL behind a proxy): retrying will not help
            what = "_bulk_docs" if r.status >= 300 else "_bulk_docs: not a CouchDB answer"
            return Result.fatal(self._fail(what, r))
        # Match answers to docs by id, not position: CouchDB answers in request order, but
        # pouchdb-server's LevelDB adapter does not always.
        answers: dict[str, list[dict[str, Any]]] = {}
        for x in results:
            if isinstance(x, dict):
                answers.setdefault(str(x.get("id")), []).append(x)
        for doc_id in ids:
            pending = answers.get(doc_id)
            if not pending:
                # No answer for a doc: it may not be stored. Send the batch again (replayed
                # docs then come back as conflicts).
                return Result.retry(
                    None, self._fail(f"_bulk_docs: no answer for document {doc_id}", r))
            x = pending.pop(0)
            if "error" not in x:
                self.stored += 1
            elif x.get("error") == CONFLICT:
                self.replayed += 1
            else:
                rejected.append(f"{doc_id}: {x.get('error')}: {x.get('reason', '')}")
        return None

    def flush(self) -> None:
        """Nothing to do: CouchDB has committed a document when `_bulk_docs` answers 201."""

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def health(self) -> dict[str, Any]:
        return {
            "url": redact_url(self.url),
            "database": self.database,
            "location": self.location,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "index": self.index,
            "stored": self.stored,
            "replayed": self.replayed,
            "rejected": self.rejected,
            "requests": self.requests,
        }
