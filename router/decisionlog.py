"""The decision log: every Route decision and its reported outcome, in SQLite (WAL) or PostgreSQL.

Decisions are written off the request path: `record` appends to an in-memory buffer and a
writer thread commits batches (one executemany per transaction). Outcomes are written
synchronously: `report_outcome` returns only after the row is committed, so an acknowledged
outcome survives a crash of the process. One SQLAlchemy Core schema serves both databases.

Privacy: the log keeps the prompt's embedding (float16), a salted hash and its length; the raw
prompt only when the caller sets `DecisionRecord.prompt` (a profile that opts in).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO_ROOT / "var" / "decisions.db"
SQLITE_BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another connection's write lock
MAX_RETRY_BACKOFF_S = 5.0  # the writer thread's longest pause between retries while the database is away
_REQUEST_KEY = "\0request:"  # prefix that keeps request ids apart from decision ids in the pending index


def default_url() -> str:
    """The embedded default: an SQLite file under the repo's git-ignored var/."""
    return f"sqlite:///{DEFAULT_PATH}"


class UnknownDecision(KeyError):
    """An outcome names a decision id (or request id) the log has never seen."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown decision"


class InvalidOutcome(ValueError):
    """A malformed outcome report; the message starts with the offending field."""


# -- the API's records -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TierScore:
    """What the router thought of one tier of the profile."""

    tier: str
    model: str
    quality: float  # P(acceptable answer)
    win_probability: float  # P(beats the cheapest tier)
    expected_cost: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRecord:
    """One Route decision as logged. Build `embedding` with `encode_embedding` and `prompt_hash`
    with `DecisionLog.hash_prompt`; leave `prompt` None unless the profile opts in."""

    decision_id: str
    created_at: dt.datetime  # timezone-aware
    profile: str
    tier: str
    model: str
    tier_index: int
    scores: tuple[TierScore, ...]  # every tier of the profile, cheap to expensive
    reason: str
    model_version: str
    embedding: bytes  # float16, encode_embedding()
    prompt_hash: str  # salted, DecisionLog.hash_prompt()
    request_id: str = ""
    profile_version: str = ""
    workflow: str = ""
    tenant: str = ""
    propensity: float = 1.0  # P(the chosen tier was picked); 1.0 without exploration
    input_tokens: int = 0
    prompt_chars: int = 0
    prompt: str | None = None
    encoder: str = ""  # whose embedding this is: the version's main encoder or a cascade's first stage

    def __post_init__(self) -> None:
        if not self.decision_id:
            raise ValueError("decision_id: empty")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at: needs a timezone (use UTC)")
        if not 0.0 < self.propensity <= 1.0:
            raise ValueError(f"propensity: {self.propensity} is not in (0, 1]")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomeRecord:
    """What happened after a decision, reported by the caller. Names its decision by
    `decision_id`, or by the caller's `request_id` (the newest decision with it)."""

    decision_id: str = ""
    request_id: str = ""
    success: bool | None = None
    score: float | None = None  # in [0, 1]; the training target when given
    rework: bool = False
    rework_cost: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    label: str = ""
    reported_at: dt.datetime | None = None  # set by the log when stored

    def __post_init__(self) -> None:
        if not self.decision_id and not self.request_id:
            raise InvalidOutcome("decision_id: give a decision id or a request id")
        if self.success is None and self.score is None:
            raise InvalidOutcome("success: give success or score")
        if self.score is not None and not 0.0 <= self.score <= 1.0:  # also false for NaN
            raise InvalidOutcome(f"score: {self.score} is not in [0, 1]")
        for name in ("rework_cost", "tokens_in", "tokens_out", "cost_usd", "latency_ms"):
            value = getattr(self, name)
            if not value >= 0:  # also catches NaN
                raise InvalidOutcome(f"{name}: {value} is negative")

    @property
    def value(self) -> float:
        """The outcome in [0, 1]: the score when given, else success as 0 or 1."""
        return float(self.score) if self.score is not None else float(bool(self.success))


def encode_embedding(vector: npt.ArrayLike) -> bytes:
    """A 1-d embedding as float16 bytes (what the log stores)."""
    return np.asarray(vector, np.float16).reshape(-1).tobytes()


def decode_embedding(blob: bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(blob, np.float16).astype(np.float32)


# -- schema ------------------------------------------------------------------------


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in and out, whatever the database keeps (SQLite keeps naive text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value}: give a timezone")
        value = value.astimezone(dt.UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


metadata = sa.MetaData()

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("decision_id", sa.String, primary_key=True),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("profile", sa.String, nullable=False),
    sa.Column("profile_version", sa.String, nullable=False),
    sa.Column("workflow", sa.String, nullable=False),
    sa.Column("tenant", sa.String, nullable=False),
    sa.Column("tier", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("tier_index", sa.Integer, nullable=False),
    sa.Column("scores", sa.JSON, nullable=False),  # [{tier, model, quality, win_probability, expected_cost}]
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("propensity", sa.Float, nullable=False),
    sa.Column("input_tokens", sa.Integer, nullable=False),
    sa.Column("prompt_chars", sa.Integer, nullable=False),
    sa.Column("prompt_hash", sa.String, nullable=False),
    sa.Column("embedding", sa.LargeBinary, nullable=False),  # float16
    sa.Column("prompt", sa.Text, nullable=True),  # only when the profile opts in
    # added after the first release: logs made before it get "" (their embeddings are the main encoder's)
    sa.Column("encoder", sa.String, nullable=False, server_default=""),
    sa.Index("ix_decisions_request_id", "request_id", "created_at"),
    sa.Index("ix_decisions_created_at", "created_at"),
)

outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("decision_id", sa.String, sa.ForeignKey("decisions.decision_id"), primary_key=True),
    sa.Column("success", sa.Boolean, nullable=True),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("rework", sa.Boolean, nullable=False),
    sa.Column("rework_cost", sa.Float, nullable=False),
    sa.Column("tokens_in", sa.Integer, nullable=False),
    sa.Column("tokens_out", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("label", sa.String, nullable=False),
    sa.Column("reported_at", UTCDateTime, nullable=False),
)


def _decision_row(rec: DecisionRecord) -> dict[str, Any]:
    row = {f.name: getattr(rec, f.name) for f in dataclasses.fields(DecisionRecord)}
    row["scores"] = [
        {
            "tier": s.tier,
            "model": s.model,
            "quality": float(s.quality),
            "win_probability": float(s.win_probability),
            "expected_cost": float(s.expected_cost),
        }
        for s in rec.scores
    ]
    return row


def _scores(raw: Sequence[Mapping[str, Any]]) -> tuple[TierScore, ...]:
    return tuple(TierScore(**s) for s in raw)


def _decision_from_row(row: Any) -> DecisionRecord:
    values = dict(row._mapping)
    values["scores"] = _scores(values["scores"])
    return DecisionRecord(**values)


def _outcome_from_row(row: Any) -> OutcomeRecord:
    return OutcomeRecord(**dict(row._mapping))


# outcome columns, plus the decision's request id, for reading an OutcomeRecord back
_OUTCOME_SELECT = sa.select(*outcomes.c, decisions.c.request_id).join_from(outcomes, decisions)


# -- training reads ----------------------------------------------------------------


@dataclass(frozen=True)
class LabeledDecisions:
    """Decisions with outcomes, oldest first, as arrays for training (`DecisionLog.labeled`)."""

    decision_id: list[str]
    created_at: npt.NDArray[np.datetime64]  # (N,) UTC, microseconds
    profile: list[str]
    model_version: list[str]
    model: list[str]  # the chosen tier's model, whose outcome this is
    tier_index: npt.NDArray[np.int64]  # (N,)
    scores: list[tuple[TierScore, ...]]  # every tier as the router saw it
    propensity: npt.NDArray[np.float64]  # (N,)
    embedding: npt.NDArray[np.float32]  # (N, dim)
    prompt_chars: npt.NDArray[np.float32]  # (N,)
    success: npt.NDArray[np.float32]  # (N,) 0/1, NaN where only a score was given
    score: npt.NDArray[np.float32]  # (N,) NaN where not given
    outcome: npt.NDArray[np.float32]  # (N,) the target: score if given, else success
    rework: npt.NDArray[np.bool_]  # (N,)
    cost_usd: npt.NDArray[np.float64]  # (N,)
    prompt: list[str]  # the prompt where the profile stored it (`store_prompts`), else ""

    def __len__(self) -> int:
        return len(self.decision_id)

    def take(self, index: npt.ArrayLike) -> LabeledDecisions:
        """The rows at `index` (integer positions or a boolean mask), in that order."""
        idx = np.arange(len(self))[np.asarray(index)]
        parts: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts[f.name] = value[idx] if isinstance(value, np.ndarray) else [value[i] for i in idx]
        return LabeledDecisions(**parts)


# -- the log -----------------------------------------------------------------------


def _make_engine(url: sa.URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    memory = url.database in (None, "", ":memory:")
    if not memory:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    engine = sa.create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        **({"poolclass": StaticPool} if memory else {}),
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL: readers never block the writer; FULL: a commit is on disk before it returns.
        cur = dbapi_conn.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            f"busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}",
            "foreign_keys=ON",
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    return engine


_TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError)  # the database is away or locked: retry later


class DecisionLog:
    """The decision and outcome log behind one database URL (SQLite file or PostgreSQL).

    `record` never blocks and never raises for a database problem: decisions wait in a buffer
    of at most `max_pending` (beyond that they are dropped and counted in `dropped`) until the
    writer thread commits them, `batch_size` per transaction, at least every `flush_interval_s`.
    Everything else is synchronous and safe to call from several threads.
    """

    def __init__(
        self,
        url: str | sa.URL | None = None,
        *,
        salt: str | bytes | None = None,
        batch_size: int = 256,
        flush_interval_s: float = 0.2,
        max_pending: int = 100_000,
        warn_every: int = 1000,
    ) -> None:
        self.url = sa.make_url(url or default_url())
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.warn_every = warn_every
        self._salt = salt.encode("utf-8") if isinstance(salt, str) else salt
        self.engine = _make_engine(self.url)
        self._create_tables()
        self._pending: collections.deque[DecisionRecord] = collections.deque()
        self._pending_keys: dict[str, int] = {}  # decision and request ids in the buffer (or being written)
        self._lock = threading.Lock()  # guards the buffer, its index and the counters
        self._write_lock = threading.Lock()  # one batch writer at a time: the thread or a flush
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # decisions lost: buffer full, log closed, or a row the database refused
        self.written = 0

    def __repr__(self) -> str:
        return f"DecisionLog({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create_tables(self) -> None:
        try:
            metadata.create_all(self.engine)
        except sa.exc.DBAPIError:
            # another replica created them between our check and our CREATE
            metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Columns added to `decisions` after a log was made: added in place, with their default."""
        for _ in range(2):  # a second pass if another replica added one between our check and ours
            present = {c["name"] for c in sa.inspect(self.engine).get_columns("decisions")}
            missing = [c for c in decisions.columns if c.name not in present]
            if not missing:
                return
            try:
                with self.engine.begin() as conn:
                    for col in missing:
                        kind = col.type.compile(dialect=self.engine.dialect)
                        default = col.server_default.arg if col.server_default is not None else None  # type: ignore[attr-defined]
                        conn.execute(sa.text(
                            f"ALTER TABLE decisions ADD COLUMN {col.name} {kind}"
                            + (f" NOT NULL DEFAULT '{default}'" if default is not None else "")
                        ))
                        log.info("decision log: added column decisions.%s", col.name)
            except sa.exc.DBAPIError:
                continue

    @property
    def pending(self) -> int:
        return len(self._pending)

    def hash_prompt(self, text: str) -> str:
        """HMAC-SHA256 of the prompt with this deployment's salt, hex: equal prompts match
        within a deployment, and a hash cannot be checked against guesses without the salt."""
        if not self._salt:
            raise ValueError("this DecisionLog has no salt: pass salt= to hash prompts")
        return hmac.new(self._salt, text.encode("utf-8"), hashlib.sha256).hexdigest()

    # -- decisions: buffered --------------------------------------------------------

    def record(self, rec: DecisionRecord) -> None:
        """Queue a decision for the writer thread; O(1), never blocks on the database."""
        with self._lock:
            full = self._closed or len(self._pending) >= self.max_pending
            if full:
                self.dropped += 1
                dropped = self.dropped
            else:
                self._pending.append(rec)
                self._index(rec, +1)
                n = len(self._pending)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="decision-log-writer", daemon=True)
                    self._thread.start()
        if full:
            if dropped % self.warn_every == 1 or self.warn_every == 1:
                why = "closed" if self._closed else f"{self.max_pending} decisions waiting for the database"
                log.warning("decision log %s: dropped %d decisions so far", why, dropped)
        elif n >= self.batch_size:
            self._wake.set()

    def _index(self, rec: DecisionRecord, delta: int) -> None:
        keys = (rec.decision_id, _REQUEST_KEY + rec.request_id) if rec.request_id else (rec.decision_id,)
        for key in keys:
            count = self._pending_keys.get(key, 0) + delta
            if count:
                self._pending_keys[key] = count
            else:
                del self._pending_keys[key]

    def flush(self) -> int:
        """Write every decision recorded before this call; returns how many this call wrote.
        Raises the database's error if it is away (the decisions stay queued)."""
        return self._drain()

    def _drain(self) -> int:
        written = 0
        with self._write_lock:
            todo = len(self._pending)  # what is queued now; later records wait for the thread
            while todo > 0:
                with self._lock:
                    batch = [self._pending.popleft() for _ in range(min(self.batch_size, todo, len(self._pending)))]
                if not batch:
                    break
                todo -= len(batch)
                try:
                    ok = self._write(batch)
                except _TRANSIENT:
                    with self._lock:
                        self._pending.extendleft(reversed(batch))
                    raise
                with self._lock:
                    for rec in batch:
                        self._index(rec, -1)
                    self.written += ok
                    self.dropped += len(batch) - ok
                written += ok
        return written

    def _write(self, batch: list[DecisionRecord]) -> int:
        """Insert a batch in one transaction; if the database refuses it (a duplicate id, a bad
        value), insert row by row and drop only the refused rows. Returns the rows written."""
        rows = [_decision_row(r) for r in batch]
        try:
            with self.engine.begin() as conn:
                conn.execute(decisions.insert(), rows)
            return len(rows)
        except _TRANSIENT:
            raise
        except sa.exc.SQLAlchemyError as e:
            log.warning("decision batch refused (%s); writing its %d rows one by one", type(e).__name__, len(rows))
        ok = 0
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(decisions.insert(), row)
                ok += 1
            except _TRANSIENT:
                raise
            except sa.exc.SQLAlchemyError as e:
                log.error("decision %s not logged: %s", row["decision_id"], e)
        return ok

    def _run(self) -> None:
        backoff = self.flush_interval_s
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self._drain()
                backoff = self.flush_interval_s
            except _TRANSIENT as e:
                log.warning("decision log: database unavailable (%s); %d decisions waiting", e, self.pending)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, MAX_RETRY_BACKOFF_S)
            except Exception:
                log.exception("decision log writer failed; retrying")
                self._stop.wait(backoff)

    def close(self) -> None:
        """Stop the writer and write everything still queued. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join()
        try:
            self._drain()
        except Exception:
            log.exception("decision log closed with %d decisions not written", self.pending)
        self.engine.dispose()

    # -- outcomes: synchronous and durable ------------------------------------------

    def report_outcome(self, out: OutcomeRecord) -> tuple[OutcomeRecord, bool]:
        """Store an outcome; returns (the stored outcome, created). Idempotent per decision:
        if one is already stored, returns it with created=False and changes nothing.
        Raises UnknownDecision when no logged decision matches, and sqlalchemy's OperationalError
        when the database is unavailable. Returns after the commit."""
        if self._closed:
            raise RuntimeError("decision log is closed")
        key = out.decision_id or _REQUEST_KEY + out.request_id
        with self._lock:
            queued = key in self._pending_keys
        if queued:  # the decision may still be in the buffer (outcomes can follow within ms)
            self.flush()
        with self.engine.connect() as conn:
            decision_id, request_id = self._resolve(conn, out)
        reported_at = dt.datetime.now(dt.UTC)
        stored = dataclasses.replace(out, decision_id=decision_id, request_id=request_id, reported_at=reported_at)
        row = {f.name: getattr(stored, f.name) for f in dataclasses.fields(OutcomeRecord) if f.name != "request_id"}
        try:
            with self.engine.begin() as conn:
                existing = conn.execute(_OUTCOME_SELECT.where(outcomes.c.decision_id == decision_id)).first()
                if existing is not None:
                    return _outcome_from_row(existing), False
                conn.execute(outcomes.insert(), row)
        except sa.exc.IntegrityError:
            # a concurrent report of the same decision committed first
            again = self.outcome(decision_id)
            if again is None:
                raise
            return again, False
        return stored, True

    def _resolve(self, conn: Connection, out: OutcomeRecord) -> tuple[str, str]:
        """(decision_id, request_id) of the decision an outcome names."""
        query = sa.select(decisions.c.decision_id, decisions.c.request_id)
        if out.decision_id:
            query = query.where(decisions.c.decision_id == out.decision_id)
        else:
            query = (
                query.where(decisions.c.request_id == out.request_id)
                .order_by(decisions.c.created_at.desc(), decisions.c.decision_id.desc())
                .limit(1)
            )
        found = conn.execute(query).first()
        if found is None:
            what = f"decision_id {out.decision_id!r}" if out.decision_id else f"request_id {out.request_id!r}"
            raise UnknownDecision(f"no logged decision with {what}")
        return found.decision_id, found.request_id

    # -- reads -----------------------------------------------------------------------

    def decision(self, decision_id: str) -> DecisionRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(decisions).where(decisions.c.decision_id == decision_id)).first()
        return None if row is None else _decision_from_row(row)

    def outcome(self, decision_id: str) -> OutcomeRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_OUTCOME_SELECT.where(outcomes.c.decision_id == decision_id)).first()
        return None if row is None else _outcome_from_row(row)

    def count(self, *, with_outcome: bool = False) -> int:
        """Decisions in the database (not counting the buffer); with_outcome: those with an outcome."""
        table = outcomes if with_outcome else decisions
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())

    def iter_decisions(self, since: dt.datetime | None = None) -> Iterator[DecisionRecord]:
        """Every logged decision, oldest first (for export and inspection)."""
        query = sa.select(decisions).order_by(decisions.c.created_at, decisions.c.decision_id)
        if since is not None:
            query = query.where(decisions.c.created_at >= since)
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(query):
                yield _decision_from_row(row)

    def labeled(
        self, since: dt.datetime | None = None, limit: int | None = None, encoder: str | None = None,
        *, exact: bool = False,
    ) -> LabeledDecisions:
        """Decisions that have an outcome, oldest first: those made at or after `since`, and of
        those the newest `limit`. With `encoder`, only rows embedded by that encoder (or, unless
        `exact`, logged before the log named encoders, which a cascade's first stage never made)
        are kept; rows whose embedding size differs from the newest kept row's (an older
        encoder) are left out too, with a warning."""
        d, o = decisions.c, outcomes.c
        query = (
            sa.select(
                d.decision_id, d.created_at, d.profile, d.model_version, d.model, d.tier_index, d.scores,
                d.propensity, d.embedding, d.prompt_chars, d.encoder, d.prompt,
                o.success, o.score, o.rework, o.cost_usd,
            )
            .join_from(decisions, outcomes)
            .order_by(d.created_at.desc(), d.decision_id.desc())
        )  # fmt: skip
        if since is not None:
            query = query.where(d.created_at >= since)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()[::-1]
        if encoder is not None:
            mine = [r for r in rows if r.encoder == encoder or (r.encoder == "" and not exact)]
            if len(mine) < len(rows):
                log.warning(
                    "left out %d logged outcomes embedded by another encoder than %s (the other stage of a cascade)",
                    len(rows) - len(mine), encoder,
                )
            rows = mine
        dim = len(rows[-1].embedding) // 2 if rows else 0
        kept = [r for r in rows if len(r.embedding) == 2 * dim]
        if len(kept) < len(rows):
            log.warning("left out %d logged outcomes whose embedding is not %d-d", len(rows) - len(kept), dim)
        nan = float("nan")
        success = np.array([nan if r.success is None else float(r.success) for r in kept], np.float32)
        score = np.array([nan if r.score is None else r.score for r in kept], np.float32)
        return LabeledDecisions(
            decision_id=[r.decision_id for r in kept],
            created_at=np.array([r.created_at.replace(tzinfo=None) for r in kept], "datetime64[us]"),
            profile=[r.profile for r in kept],
            model_version=[r.model_version for r in kept],
            model=[r.model for r in kept],
            tier_index=np.array([r.tier_index for r in kept], np.int64),
            scores=[_scores(r.scores) for r in kept],
            propensity=np.array([r.propensity for r in kept], np.float64),
            embedding=(
                np.stack([decode_embedding(r.embedding) for r in kept]) if kept else np.zeros((0, 0), np.float32)
            ),
            prompt_chars=np.array([r.prompt_chars for r in kept], np.float32),
            success=success,
            score=score,
            outcome=np.where(np.isnan(score), success, score).astype(np.float32),
            rework=np.array([bool(r.rework) for r in kept], np.bool_),
            cost_usd=np.array([r.cost_usd for r in kept], np.float64),
            prompt=[r.prompt or "" for r in kept],
        )
