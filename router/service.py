"""gRPC servicer: proto <-> domain conversion, request checks, and the one error-to-status table."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from router import metrics
from router.batcher import MicroBatcher, Overloaded, ShuttingDown
from router.config import Settings
from router.decisionlog import (
    DEFAULT_PATH,
    DecisionLog,
    DecisionRecord,
    InvalidOutcome,
    OutcomeRecord,
    TierScore,
    UnknownDecision,
    encode_embedding,
)
from router.engine import RouteQuery, RouteResult
from router.monitor import DriftMonitor
from router.policy import EscalationRefused, RequestContext
from router.profiles import LiveProfiles, Profile, ProfileSet, UnknownProfile
from router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256  # workflow, stage, tenant, request_id, profile, escalation.failure
MAX_OUTPUT_TOKENS = 1_000_000
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class InvalidRequest(ValueError):
    """A request the caller must fix; the message starts with the offending field."""


class LogUnavailable(RuntimeError):
    """ReportOutcome on a server without a decision log."""


# The one table from domain errors to gRPC status codes.
STATUS_FOR: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownProfile: grpc.StatusCode.INVALID_ARGUMENT,
    EscalationRefused: grpc.StatusCode.FAILED_PRECONDITION,
    UnknownDecision: grpc.StatusCode.NOT_FOUND,
    LogUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: Exception) -> grpc.StatusCode | None:
    for kind, code in STATUS_FOR.items():
        if isinstance(exc, kind):
            return code
    return None


def _error_text(exc: Exception) -> str:
    if isinstance(exc, UnknownProfile):
        return f"profile: unknown profile {exc.args[0]!r}"
    if isinstance(exc, UnknownDecision):
        return str(exc.args[0]) if exc.args else "unknown decision"
    return str(exc)


# -- proto -> domain ---------------------------------------------------------------


def _check_id(value: str, field: str) -> None:
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{field}: at most {MAX_ID_CHARS} characters, got {len(value)}")


def request_text(request: router_pb2.RouteRequest, field: str = "") -> tuple[str, str]:
    """The text to route and which end survives truncation (see router.tokenizer)."""
    if request.prompt and request.messages:
        raise InvalidRequest(f"{field}prompt, {field}messages: set exactly one of them, not both")
    if request.prompt:
        if not request.prompt.strip():
            raise InvalidRequest(f"{field}prompt: must contain non-whitespace text")
        return request.prompt, "head"
    if not request.messages:
        raise InvalidRequest(f"{field}prompt: required (or {field}messages), neither was set")
    for i, m in enumerate(request.messages):
        if m.role not in MESSAGE_ROLES:
            raise InvalidRequest(
                f"{field}messages[{i}].role: {m.role!r} is not one of {sorted(MESSAGE_ROLES)}"
            )
    text = "\n".join(m.content for m in request.messages if m.content)
    if not text.strip():
        raise InvalidRequest(f"{field}messages: every message content is empty")
    return text, "tail"


def _tier(profile: Profile, name: str, field: str) -> int | None:
    if not name:
        return None
    try:
        return profile.tier_index(name)
    except ValueError:
        raise InvalidRequest(
            f"{field}: unknown tier {name!r} in profile {profile.name!r}; tiers: {list(profile.tier_names)}"
        ) from None


def to_context(request: router_pb2.RouteRequest, profile: Profile, field: str = "") -> RequestContext:
    """The request's rule inputs and overrides, checked against its profile."""
    min_tier = _tier(profile, request.min_tier, field + "min_tier")
    max_tier = _tier(profile, request.max_tier, field + "max_tier")
    if min_tier is not None and max_tier is not None and min_tier > max_tier:
        raise InvalidRequest(f"{field}min_tier: {request.min_tier!r} is above {field}max_tier {request.max_tier!r}")
    floor = request.quality_floor if request.HasField("quality_floor") else None
    if floor is not None and not 0.0 <= floor <= 1.0:  # NaN fails too
        raise InvalidRequest(f"{field}quality_floor: must be in [0, 1], got {floor}")
    max_cost = request.max_cost if request.HasField("max_cost") else None
    if max_cost is not None and not 0.0 <= max_cost < float("inf"):
        raise InvalidRequest(f"{field}max_cost: must be a finite number of USD >= 0, got {max_cost}")
    output_tokens = request.expected_output_tokens if request.HasField("expected_output_tokens") else None
    if output_tokens is not None and output_tokens > MAX_OUTPUT_TOKENS:
        raise InvalidRequest(f"{field}expected_output_tokens: at most {MAX_OUTPUT_TOKENS}, got {output_tokens}")
    escalate_from = None
    if request.HasField("escalation"):
        esc, efield = request.escalation, field + "escalation"
        _check_id(esc.failure, efield + ".failure")
        if not esc.failed_tier:
            raise InvalidRequest(f"{efield}.failed_tier: required when escalating")
        escalate_from = _tier(profile, esc.failed_tier, efield + ".failed_tier")
        if escalate_from == len(profile.tiers) - 1:
            raise EscalationRefused(
                f"{efield}.failed_tier: {esc.failed_tier!r} is the most capable tier of profile "
                f"{profile.name!r}; there is nothing to escalate to"
            )
        if esc.previous_escalations >= profile.max_escalations:
            raise EscalationRefused(
                f"{efield}.previous_escalations: profile {profile.name!r} allows {profile.max_escalations} "
                f"escalations per request, this would be number {esc.previous_escalations + 1}"
            )
    return RequestContext(
        workflow=request.workflow, stage=request.stage, tenant=request.tenant, min_tier=min_tier,
        max_tier=max_tier, quality_floor=floor, max_cost=max_cost, output_tokens=output_tokens,
        escalate_from=escalate_from,
    )


def to_query(request: router_pb2.RouteRequest, profiles: ProfileSet, field: str = "") -> RouteQuery:
    for name in ("profile", "workflow", "tenant", "request_id", "stage"):
        _check_id(getattr(request, name), field + name)
    text, keep = request_text(request, field)
    try:
        profile = profiles.get(request.profile)
    except UnknownProfile:
        raise InvalidRequest(
            f"{field}profile: unknown profile {request.profile!r}; known: {sorted(profiles.profiles)}"
        ) from None
    return RouteQuery(text=text, profile=profile, keep=keep, context=to_context(request, profile, field))  # type: ignore[arg-type]


# -- domain -> proto ---------------------------------------------------------------


def to_response(
    result: RouteResult, query: RouteQuery, request: router_pb2.RouteRequest, field: str = ""
) -> router_pb2.RouteResponse:
    choice = result.choice
    if choice.refused:
        raise EscalationRefused(field + choice.refused)
    return router_pb2.RouteResponse(
        tier=choice.tier,
        model=choice.model,
        confidence=choice.confidence,
        scores=[
            router_pb2.TierScore(tier=t.name, model=t.model, quality=q, win_probability=w, expected_cost=c)
            for t, q, w, c in zip(query.profile.tiers, result.quality, result.win_probability, result.costs,
                                  strict=True)
        ],
        reason=choice.reason,
        model_version=result.model_version,
        decision_id=uuid.uuid4().hex,
        profile=query.profile.name,
        request_id=request.request_id,
        expected_cost=choice.cost,
        frontier_cost=result.frontier_cost,
        profile_version=query.profile.version,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        propensity=choice.propensity,
        encoder=result.encoder,
    )


# -- the servicer -------------------------------------------------------------------


def open_decision_log(settings: Settings) -> DecisionLog | None:
    """The decision log the settings name (None when 'off'); the salt of prompt hashes comes from
    the settings or, when empty, from var/decision-log.salt (made on first use)."""
    if settings.decision_log_url.strip().lower() == "off":
        log.info("decision log off: decisions are not recorded, ReportOutcome answers UNAVAILABLE")
        return None
    salt = settings.decision_log_salt or _local_salt()
    dlog = DecisionLog(settings.decision_log_url or None, salt=salt)
    log.info("decision log: %r", dlog)
    return dlog


def _local_salt() -> str:
    """var/decision-log.salt, made on first use. Replicas started together on one host race to
    make it: the first link wins and every one reads that salt, never one of its own."""
    path = DEFAULT_PATH.parent / "decision-log.salt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # fails if the file exists: never replaces another's salt
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def to_outcome(request: router_pb2.OutcomeRequest) -> OutcomeRecord:
    _check_id(request.decision_id, "decision_id")
    _check_id(request.request_id, "request_id")
    _check_id(request.label, "label")
    for name in ("rework_cost", "cost_usd", "latency_ms"):
        value = getattr(request, name)
        if not 0.0 <= value < float("inf"):
            raise InvalidRequest(f"{name}: must be a finite number >= 0, got {value}")
    try:
        return OutcomeRecord(
            decision_id=request.decision_id, request_id=request.request_id,
            success=request.success if request.HasField("success") else None,
            score=request.score if request.HasField("score") else None,
            rework=request.rework, rework_cost=request.rework_cost, tokens_in=request.tokens_in,
            tokens_out=request.tokens_out, cost_usd=request.cost_usd, latency_ms=request.latency_ms,
            label=request.label,
        )
    except InvalidOutcome as e:
        raise InvalidRequest(str(e)) from None


def to_decision_record(
    resp: router_pb2.RouteResponse, result: RouteResult, query: RouteQuery, request: router_pb2.RouteRequest,
    dlog: DecisionLog,
) -> DecisionRecord:
    profile = query.profile
    return DecisionRecord(
        decision_id=resp.decision_id, created_at=dt.datetime.now(dt.UTC), profile=profile.name,
        tier=resp.tier, model=resp.model, tier_index=result.choice.tier_index,
        scores=tuple(
            TierScore(tier=s.tier, model=s.model, quality=q, win_probability=w, expected_cost=c)
            for s, q, w, c in zip(resp.scores, result.quality, result.win_probability, result.costs, strict=True)
        ),
        reason=resp.reason, model_version=resp.model_version, embedding=encode_embedding(result.embedding),
        prompt_hash=dlog.hash_prompt(query.text), request_id=request.request_id, profile_version=profile.version,
        workflow=request.workflow, tenant=request.tenant, propensity=result.choice.propensity,
        input_tokens=result.input_tokens, prompt_chars=len(query.text),
        prompt=query.text if profile.store_prompts else None, encoder=result.encoder,
    )


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Glue only: check and convert, await the batcher, convert back, log the decision."""

    def __init__(self, batcher: MicroBatcher[RouteQuery, RouteResult], profiles: LiveProfiles,
                 *, max_batch_request: int, decision_log: DecisionLog | None = None,
                 drift: DriftMonitor | None = None,
                 route_now: Callable[[RouteQuery], RouteResult | None] | None = None,
                 outcome_wait_s: float = 1.0) -> None:
        self._batcher = batcher
        self._outcome_wait_s = outcome_wait_s
        self._route_now = route_now  # routes a call at once when the server is quiet, else None (RouterServer)
        self._profiles = profiles
        self._max_batch_request = max_batch_request
        self._log = decision_log
        self._drift = drift

    def _answer(self, result: RouteResult, query: RouteQuery, request: router_pb2.RouteRequest,
                field: str = "") -> router_pb2.RouteResponse:
        resp = to_response(result, query, request, field)
        if self._log is not None:
            self._log.record(to_decision_record(resp, result, query, request, self._log))
            metrics.DECISIONS_PENDING.set(self._log.pending)
            metrics.DECISIONS_DROPPED.set(self._log.dropped)
        if self._drift is not None:
            self._drift.observe(query, result)
        return resp

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        query = to_query(request, self._profiles.current)
        result = None if self._route_now is None else self._route_now(query)
        if result is None:
            result = await self._batcher.submit(query)
        return self._answer(result, query, request)

    async def RouteBatch(
        self, request: router_pb2.RouteBatchRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteBatchResponse:
        n = len(request.requests)
        if not 1 <= n <= self._max_batch_request:
            raise InvalidRequest(f"requests: between 1 and {self._max_batch_request} entries, got {n}")
        profiles = self._profiles.current  # one version for the whole batch
        queries = [to_query(r, profiles, f"requests[{i}].") for i, r in enumerate(request.requests)]
        results = await self._batcher.submit_many(queries)
        for i, res in enumerate(results):  # refuse before logging any of them
            if res.choice.refused:
                raise EscalationRefused(f"requests[{i}].{res.choice.refused}")
        return router_pb2.RouteBatchResponse(
            responses=[self._answer(res, q, r, f"requests[{i}].")
                       for i, (res, q, r) in enumerate(zip(results, queries, request.requests, strict=True))]
        )

    async def ReportOutcome(
        self, request: router_pb2.OutcomeRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.OutcomeResponse:
        if self._log is None:
            raise LogUnavailable("the decision log is off on this server (decision_log_url=off)")
        outcome = to_outcome(request)
        stored, created = await self._report(self._log, outcome)
        when = stored.reported_at.isoformat(timespec="seconds") if stored.reported_at else "?"
        return router_pb2.OutcomeResponse(
            decision_id=stored.decision_id, created=created,
            message="recorded" if created else f"already recorded at {when}; nothing changed",
        )

    async def _report(self, log: DecisionLog, outcome: OutcomeRecord) -> tuple[OutcomeRecord, bool]:
        """Store an outcome; returns after the commit. A decision that is not in the log yet may be
        another replica's, still in that replica's buffer: look again, with growing pauses and no
        thread held between tries, for up to `outcome_wait_s` before answering NOT_FOUND."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._outcome_wait_s
        pause = 0.02
        while True:
            try:
                return await asyncio.to_thread(log.report_outcome, outcome)
            except UnknownDecision:
                left = deadline - loop.time()
                if left <= 0:
                    raise
                await asyncio.sleep(min(pause, left))
                pause = min(2 * pause, 0.2)


# -- undecodable requests ------------------------------------------------------------


class _Undecodable:
    """Stands in for a request protobuf could not parse, so the RPC can name the field."""

    def __init__(self, message: str) -> None:
        self.message = message


@functools.cache
def _bytes_twin(cls: type[Message]) -> type[Message] | None:
    """The same message with every `string` field declared `bytes`, to find invalid UTF-8.
    None when the file cannot stand alone (it imports other files): then no field is named."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    cls.DESCRIPTOR.file.CopyToProto(file_proto)
    if file_proto.dependency:
        return None
    package = file_proto.package
    file_proto.name = "lenient/" + file_proto.name
    file_proto.package = "lenient." + package
    file_proto.ClearField("service")

    def relax(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for msg in messages:
            for f in msg.field:
                if f.type == FieldDescriptor.TYPE_STRING:
                    f.type = FieldDescriptor.TYPE_BYTES
                if f.type_name.startswith(f".{package}."):
                    f.type_name = ".lenient" + f.type_name
            relax(msg.nested_type)

    relax(file_proto.message_type)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("lenient." + cls.DESCRIPTOR.full_name)
    )


def _is_repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 6 dropped `label`
    return bool(flag) if flag is not None else fd.label == FieldDescriptor.LABEL_REPEATED


def _first_bad_utf8(msg: Message, prefix: str = "") -> str | None:
    for fd, value in msg.ListFields():
        repeated = _is_repeated(fd)
        for i, v in enumerate(value if repeated else [value]):
            path = prefix + fd.name + (f"[{i}]" if repeated else "")
            if isinstance(v, Message):
                if (bad := _first_bad_utf8(v, path + ".")) is not None:
                    return bad
            elif isinstance(v, bytes):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    return path
    return None


def _lenient_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    cls = getattr(deserialize, "__self__", None)

    def lenient(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            field = None
            try:  # find which string field is not UTF-8; never let the analysis itself fail
                twin = _bytes_twin(cls) if isinstance(cls, type) and issubclass(cls, Message) else None
                field = _first_bad_utf8(twin.FromString(data)) if twin is not None else None
            except Exception:
                log.debug("cannot analyse undecodable request", exc_info=True)
            if field is not None:
                return _Undecodable(f"{field}: not valid UTF-8")
            return _Undecodable("request: not a valid protobuf message for this method")

    return lenient


# -- the last-resort interceptor -------------------------------------------------------

Handler = TypeVar("Handler")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors through STATUS_FOR; anything else is logged with its traceback
    and answered INTERNAL. Undecodable requests become INVALID_ARGUMENT naming the field.
    Router RPCs are timed and counted by status code (router.metrics)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming methods (health Watch, reflection) pass through
        inner = handler.unary_unary
        method = handler_call_details.method
        service, _, short_name = method.lstrip("/").rpartition("/")

        async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                code = status_for(e)
                if code is None:
                    log.exception("unhandled error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server log")
                await context.abort(code, _error_text(e))

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code: grpc.StatusCode | None = None
            try:
                return await answer(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                code = code or context.code() or grpc.StatusCode.OK  # abort() has set it
                metrics.observe_rpc(short_name, code.name, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            timed if service == ROUTER_SERVICE else answer,  # health and reflection untimed
            request_deserializer=_lenient_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
