"""The decision log on SQLite and on a real PostgreSQL server (ROUTER_TEST_POSTGRES_URL; .ci/run starts one)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from router.decisionlog import (
    DecisionLog,
    DecisionRecord,
    InvalidOutcome,
    OutcomeRecord,
    TierScore,
    UnknownDecision,
    decode_embedding,
    encode_embedding,
)

REPO = Path(__file__).resolve().parents[2]
PG_ENV = "ROUTER_TEST_POSTGRES_URL"
T0 = dt.datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: an SQLite file, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'decisions.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL not available: set {PG_ENV} (.ci/run starts one)")
    name = f"router_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_decision(
    log: DecisionLog,
    decision_id: str,
    *,
    request_id: str = "",
    seconds: float = 0.0,
    text: str = "What is the capital of France?",
    prompt: str | None = None,
    propensity: float = 1.0,
) -> DecisionRecord:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(decision_id.encode()).digest()[:4], "big"))
    return DecisionRecord(
        decision_id=decision_id,
        request_id=request_id,
        created_at=T0 + dt.timedelta(seconds=seconds),
        profile="default",
        profile_version="abc123",
        workflow="support",
        tenant="acme",
        tier="mid",
        model="mixtral-8x7b-instruct-v0.1",
        tier_index=1,
        scores=(
            TierScore(tier="budget", model="gpt-3.5-turbo-0301", quality=0.31, win_probability=0.5, expected_cost=1e-4),
            TierScore(tier="mid", model="mixtral-8x7b-instruct-v0.1", quality=0.62, win_probability=0.58),
            TierScore(tier="frontier", model="gpt-4-1106-preview", quality=0.9, win_probability=0.81),
        ),
        reason="classifier",
        model_version="20261123-b154b88a",
        propensity=propensity,
        input_tokens=9,
        prompt_chars=len(text),
        prompt_hash=log.hash_prompt(text),
        embedding=encode_embedding(rng.normal(size=8).astype(np.float32)),
        prompt=prompt,
    )


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_decisions_are_written_in_batches_by_the_writer_thread(db_url: str) -> None:
    with DecisionLog(db_url, salt="s", batch_size=8, flush_interval_s=60) as log:
        inserts: list[int] = []
        sa.event.listen(
            log.engine,
            "before_cursor_execute",
            lambda conn, cur, stmt, params, ctx, many: inserts.append(1) if "INSERT INTO decisions" in stmt else None,
        )
        recs = [make_decision(log, f"d{i}", seconds=i) for i in range(50)]
        for rec in recs[:48]:
            log.record(rec)
        # six full batches wake the writer; nothing waits for the 60 s timer
        assert wait_for(lambda: log.count() == 48), log.count()
        for rec in recs[48:]:
            log.record(rec)
        assert log.pending == 2 and log.count() == 48
        assert log.flush() == 2
        assert log.count() == 50 and log.written == 50 and log.dropped == 0
        assert len(inserts) <= 7  # one statement per batch, not per row
        assert log.decision("d7") == recs[7]  # every field round-trips, UTC times included
        assert log.decision("nope") is None


def test_report_outcome_by_decision_id_and_by_request_id(db_url: str) -> None:
    with DecisionLog(db_url, salt="s") as log:
        for rec in (
            make_decision(log, "d1", request_id="req-1", seconds=0),
            make_decision(log, "d2", request_id="req-1", seconds=5),  # a retry of the same request
            make_decision(log, "d3", request_id="req-3", seconds=1),
        ):
            log.record(rec)
        log.flush()

        stored, created = log.report_outcome(OutcomeRecord(request_id="req-1", success=True, tokens_out=120))
        assert created and stored.decision_id == "d2"  # the newest decision with that request id
        assert stored.reported_at is not None and stored.reported_at.tzinfo is not None

        out = OutcomeRecord(
            decision_id="d3", score=0.25, rework=True, rework_cost=0.4, tokens_in=10, tokens_out=20,
            cost_usd=0.003, latency_ms=850.0, label="wrong-format",
        )  # fmt: skip
        stored, created = log.report_outcome(out)
        assert created and stored.request_id == "req-3" and stored.value == 0.25
        assert log.outcome("d3") == stored
        assert log.outcome("d1") is None
        assert log.count(with_outcome=True) == 2


def test_a_repeated_report_changes_nothing_and_says_so(db_url: str) -> None:
    with DecisionLog(db_url, salt="s") as log:
        log.record(make_decision(log, "d1", request_id="r1"))
        first, created = log.report_outcome(OutcomeRecord(decision_id="d1", success=True, cost_usd=0.01))
        assert created
        again, created = log.report_outcome(OutcomeRecord(decision_id="d1", success=False, cost_usd=9.0))
        assert not created and again == first
        by_request, created = log.report_outcome(OutcomeRecord(request_id="r1", score=0.0))
        assert not created and by_request == first
        assert log.outcome("d1") == first and log.count(with_outcome=True) == 1

        # racing reports of one decision: exactly one is stored
        log.record(make_decision(log, "d2"))
        log.flush()
        with ThreadPoolExecutor(8) as pool:
            results = list(
                pool.map(lambda i: log.report_outcome(OutcomeRecord(decision_id="d2", score=i / 10)), range(8))
            )
        assert sum(created for _, created in results) == 1
        assert len({stored for stored, _ in results}) == 1


def test_unknown_and_malformed_reports(db_url: str) -> None:
    with DecisionLog(db_url, salt="s") as log:
        log.record(make_decision(log, "d1", request_id="r1"))
        with pytest.raises(UnknownDecision, match="nope") as err:
            log.report_outcome(OutcomeRecord(decision_id="nope", success=True))
        assert isinstance(err.value, KeyError)
        with pytest.raises(UnknownDecision, match="request_id"):
            log.report_outcome(OutcomeRecord(request_id="r-unknown", success=True))
    for bad, field in [
        (dict(success=True), "decision_id"),
        (dict(decision_id="d1"), "success"),
        (dict(decision_id="d1", score=1.5), "score"),
        (dict(decision_id="d1", score=float("nan")), "score"),
        (dict(decision_id="d1", success=True, cost_usd=-1.0), "cost_usd"),
        (dict(decision_id="d1", success=True, latency_ms=float("nan")), "latency_ms"),
    ]:
        with pytest.raises(InvalidOutcome, match=f"^{field}"):
            OutcomeRecord(**bad)  # type: ignore[arg-type]


def test_an_outcome_can_follow_its_decision_before_the_writer_has_run(db_url: str) -> None:
    with DecisionLog(db_url, salt="s", batch_size=1000, flush_interval_s=60) as log:
        log.record(make_decision(log, "d1"))
        log.record(make_decision(log, "d2", request_id="r2"))
        assert log.pending == 2 and log.count() == 0
        assert log.report_outcome(OutcomeRecord(decision_id="d1", success=True))[1]
        assert log.report_outcome(OutcomeRecord(request_id="r2", success=False))[0].decision_id == "d2"
        assert log.pending == 0 and log.count() == 2


def test_the_prompt_is_kept_only_when_opted_in_and_the_hash_is_salted(db_url: str, tmp_path: Path) -> None:
    secret = "My account number is 4921-7733-0001, please close it"
    with DecisionLog(db_url, salt="deployment-salt") as log:
        log.record(make_decision(log, "private", text=secret))
        log.record(make_decision(log, "opted-in", text="hello there", prompt="hello there"))
        log.flush()
        private = log.decision("private")
        assert private is not None and private.prompt is None
        assert private.prompt_chars == len(secret) and len(private.prompt_hash) == 64
        assert private.prompt_hash != hashlib.sha256(secret.encode()).hexdigest()
        assert log.decision("opted-in").prompt == "hello there"  # type: ignore[union-attr]
        assert log.hash_prompt(secret) == private.prompt_hash  # stable within a deployment
    other = DecisionLog(db_url, salt="another-salt")
    assert other.hash_prompt(secret) != private.prompt_hash
    other.close()
    with pytest.raises(ValueError, match="salt"):
        DecisionLog(db_url).hash_prompt(secret)
    if db_url.startswith("sqlite"):
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("decisions.db*"))
        assert b"4921-7733" not in raw and b"hello there" in raw


def test_labeled_returns_decisions_with_outcomes_as_arrays(db_url: str) -> None:
    with DecisionLog(db_url, salt="s") as log:
        recs = [make_decision(log, f"d{i}", seconds=i, propensity=0.5 if i == 3 else 1.0) for i in range(5)]
        recs[1] = make_decision(log, "d1", seconds=1, text="kept prompt", prompt="kept prompt")  # store_prompts
        for rec in recs:
            log.record(rec)
        log.report_outcome(OutcomeRecord(decision_id="d3", score=0.75))
        log.report_outcome(OutcomeRecord(decision_id="d0", success=True))
        log.report_outcome(OutcomeRecord(decision_id="d1", success=False, rework=True))
        got = log.labeled()
        assert got.decision_id == ["d0", "d1", "d3"]  # oldest first
        assert got.embedding.dtype == np.float32 and got.embedding.shape == (3, 8)
        np.testing.assert_array_equal(got.embedding[2], decode_embedding(recs[3].embedding))
        np.testing.assert_allclose(got.outcome, [1.0, 0.0, 0.75])
        assert np.isnan(got.success[2]) and np.isnan(got.score[0])
        np.testing.assert_allclose(got.propensity, [1.0, 1.0, 0.5])
        assert got.rework.tolist() == [False, True, False]
        assert got.model == ["mixtral-8x7b-instruct-v0.1"] * 3 and got.scores[0] == recs[0].scores
        assert got.created_at[0] == np.datetime64("2026-11-23T12:00:00.123456")
        assert log.labeled(limit=2).decision_id == ["d1", "d3"]  # the newest two
        assert log.labeled(since=T0 + dt.timedelta(seconds=0.5)).decision_id == ["d1", "d3"]
        assert got.take(np.array([2, 0])).decision_id == ["d3", "d0"]
        assert got.prompt == ["", "kept prompt", ""]  # where the profile stored it


def test_a_log_made_before_the_encoder_column_gains_it_and_labeled_filters_by_encoder(db_url: str) -> None:
    with DecisionLog(db_url, salt="s") as log:
        log.record(make_decision(log, "old"))
        log.flush()
        with log.engine.begin() as conn:  # the table as the first release made it
            conn.execute(sa.text("ALTER TABLE decisions DROP COLUMN encoder"))
    with DecisionLog(db_url, salt="s") as log:  # reopened: the column is back, old rows read ""
        old = log.decision("old")
        assert old is not None
        assert old.decision_id == "old" and old.encoder == ""
        main, static = (dataclasses.replace(make_decision(log, d, seconds=i + 1), encoder=e)
                        for i, (d, e) in enumerate([("main", "minilm"), ("static", "m2v")]))
        static = dataclasses.replace(static, embedding=encode_embedding(np.ones(4, np.float32)))
        for rec in (main, static):
            log.record(rec)
        for d in ("old", "main", "static"):
            log.report_outcome(OutcomeRecord(decision_id=d, success=True))
        log.flush()
        assert [r.encoder for r in log.iter_decisions()] == ["", "minilm", "m2v"]
        assert log.labeled(encoder="minilm").decision_id == ["old", "main"]
        assert log.labeled(encoder="m2v").decision_id == ["static"]  # "old" is 8-d: another encoder
        assert log.labeled().decision_id == ["static"]  # no filter: the newest row's size decides


def test_a_full_buffer_drops_and_counts_and_close_writes_the_rest(db_url: str) -> None:
    log = DecisionLog(db_url, salt="s", batch_size=100, flush_interval_s=60, max_pending=3)
    for i in range(5):
        log.record(make_decision(log, f"d{i}"))
    assert log.dropped == 2 and log.pending == 3
    log.close()
    log.close()  # idempotent
    log.record(make_decision(log, "late"))  # after close: dropped, never raises
    assert log.dropped == 3
    with DecisionLog(db_url) as reopened:  # reading needs no salt
        assert reopened.count() == 3


DURABILITY_CHILD = """
import os, sys
from router.decisionlog import DecisionLog, OutcomeRecord
from tests.unit.test_decisionlog import make_decision

log = DecisionLog(sys.argv[1], salt="s", flush_interval_s=60)
log.record(make_decision(log, "d-kill"))
stored, created = log.report_outcome(OutcomeRecord(decision_id="d-kill", success=True, cost_usd=0.5))
assert created
print("acked", flush=True)
os.kill(os.getpid(), 9)
"""


def test_an_acknowledged_outcome_survives_kill_9(db_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DURABILITY_CHILD, db_url], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9 and proc.stdout.strip() == "acked", proc.stderr
    with DecisionLog(db_url) as log:
        stored = log.outcome("d-kill")
        assert stored is not None and stored.success is True and stored.cost_usd == 0.5
        assert log.decision("d-kill") is not None


def test_replicas_started_together_end_up_with_one_salt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers on one host, first start: both find no var/decision-log.salt. The one that
    makes it second must take the first one's salt (else their prompt hashes never match)."""
    from router import service

    monkeypatch.setattr(service, "DEFAULT_PATH", tmp_path / "var" / "decisions.db")
    salt_file = tmp_path / "var" / "decision-log.salt"
    token_hex = service.secrets.token_hex

    def the_other_replica_writes_first(n: int) -> str:  # between our check and our write
        salt_file.write_text("salt-of-the-first-replica")
        return token_hex(n)

    monkeypatch.setattr(service.secrets, "token_hex", the_other_replica_writes_first)
    assert service._local_salt() == "salt-of-the-first-replica"
    assert salt_file.read_text() == "salt-of-the-first-replica"
    assert [p.name for p in salt_file.parent.iterdir()] == ["decision-log.salt"]  # no temp file left
    monkeypatch.setattr(service.secrets, "token_hex", token_hex)
    salt_file.unlink()
    made = service._local_salt()  # alone: a fresh random salt, kept
    assert len(made) == 64 and salt_file.read_text() == made and service._local_salt() == made
