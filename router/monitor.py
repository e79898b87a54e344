"""Rolling tier shares per profile (drift against targets), and the shadow model's comparison."""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from router import metrics
from router.engine import RouteQuery, RouteResult, RoutingEngine
from router.profiles import Profile

log = logging.getLogger(__name__)


class TierShares:
    """The last `window` tiers chosen per profile, and their shares. Thread-safe."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._recent: dict[str, deque[str]] = {}
        self._counts: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()

    def add(self, profile: str, tier: str) -> None:
        with self._lock:
            recent = self._recent.setdefault(profile, deque())
            counts = self._counts.setdefault(profile, Counter())
            recent.append(tier)
            counts[tier] += 1
            if len(recent) > self.window:
                counts[recent.popleft()] -= 1

    def shares(self, profile: str, tiers: Sequence[str]) -> dict[str, float]:
        with self._lock:
            return {t: self._share(profile, t) for t in tiers}

    def share(self, profile: str, tier: str) -> float:
        with self._lock:
            return self._share(profile, tier)

    def _share(self, profile: str, tier: str) -> float:  # the lock held
        counts = self._counts.get(profile)
        return counts[tier] / max(len(self._recent[profile]), 1) if counts is not None else 0.0


class DriftMonitor:
    """Live tier shares per profile against the profile's target shares, as Prometheus gauges.

    A decision only counts its tier; each share is computed when /metrics is read (the gauges
    call TierShares.share), not on the request path."""

    def __init__(self, window: int) -> None:
        self.live = TierShares(window)
        self._exported: set[tuple[str, str]] = set()  # (profile, profile version) with gauges wired

    def observe(self, query: RouteQuery, result: RouteResult) -> None:
        profile = query.profile
        self.live.add(profile.name, result.choice.tier)
        if (profile.name, profile.version) not in self._exported:
            self._export(profile)

    def _export(self, profile: Profile) -> None:
        self._exported.add((profile.name, profile.version))
        for tier in profile.tier_names:
            metrics.TIER_SHARE.labels(profile=profile.name, tier=tier).set_function(
                functools.partial(self.live.share, profile.name, tier))
            if profile.shares and tier in profile.shares:
                metrics.TIER_SHARE_TARGET.labels(profile=profile.name, tier=tier).set(profile.shares[tier])


class Shadow:
    """Scores what the live model answered with a candidate model, off the request path: one
    worker thread, at most one batch waiting (more are skipped and counted), answers unchanged."""

    def __init__(self, engine: RoutingEngine, window: int, live: TierShares) -> None:
        self.engine = engine
        self.live = live
        self.shadow = TierShares(window)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shadow")
        self._busy = threading.Semaphore(2)  # one running + one waiting
        self.compared = 0
        self.disagreed = 0

    def submit(self, queries: Sequence[RouteQuery], results: Sequence[RouteResult]) -> None:
        if not self._busy.acquire(blocking=False):
            metrics.SHADOW_SKIPPED.inc()
            return
        self._pool.submit(self._compare, list(queries), list(results))

    def _compare(self, queries: list[RouteQuery], results: list[RouteResult]) -> None:
        try:
            theirs = self.engine.route_batch(queries)
            for q, mine, other in zip(queries, results, theirs, strict=True):
                name = q.profile.name
                self.shadow.add(name, other.choice.tier)
                self.compared += 1
                metrics.SHADOW_DECISIONS.labels(profile=name).inc()
                if other.choice.tier != mine.choice.tier or other.choice.model != mine.choice.model:
                    self.disagreed += 1
                    metrics.SHADOW_DISAGREEMENTS.labels(profile=name).inc()
                live = self.live.shares(name, q.profile.tier_names)
                for tier, share in self.shadow.shares(name, q.profile.tier_names).items():
                    metrics.SHADOW_TIER_SHARE_SHIFT.labels(profile=name, tier=tier).set(share - live[tier])
        except Exception:
            log.exception("shadow model %s failed on a batch; answers were not affected", self.engine.version)
        finally:
            self._busy.release()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
