"""Deployment profiles: tiers with their prices, the cost/quality trade-off, rules, and the price catalog.

A profiles file (config/profiles.toml) holds `[profiles.<name>]` tables; a price catalog
(config/prices.toml) holds `[models."<model>"]` tables with list prices. Both are validated
whole: a file with any error is rejected with a message naming the file and the key (or the
line, for TOML syntax), and a running server keeps the last good set (router.server).
docs/profiles.md describes the format with a complete example.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.scoring import MODES, USD_PER_MILLION

log = logging.getLogger(__name__)


class ProfileError(ValueError):
    """A profile or price file that cannot be used; the message names the file and the key."""


def _read_toml(path: Path, what: str) -> tuple[dict[str, Any], bytes]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ProfileError(f"{path}: cannot read {what}: {e}") from e
    try:
        return tomllib.loads(raw.decode("utf-8")), raw
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e


def _validation_message(path: Path, prefix: str, e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    return f"{path}: {loc}: {err['msg']}"


# -- the price catalog ----------------------------------------------------------------


class Price(BaseModel):
    """List price of one model, USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0, description="USD per million input (prompt) tokens")
    output: float = Field(ge=0, description="USD per million output (completion) tokens")
    checked: dt.date = Field(description="when the price was read from the provider's list")
    provider: str = ""


def load_prices(path: Path) -> dict[str, Price]:
    doc, _ = _read_toml(path, "price catalog")
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise ProfileError(f'{path}: needs at least one [models."<name>"] table')
    prices: dict[str, Price] = {}
    for name, body in models.items():
        if not isinstance(body, dict):
            raise ProfileError(f"{path}: models.{name} must be a table")
        try:
            prices[name] = Price(**body)
        except ValidationError as e:
            raise ProfileError(_validation_message(path, f"models.{name}", e)) from e
    return prices


# -- profiles ---------------------------------------------------------------------------


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Tier name, e.g. budget / mid / frontier.")
    model: str = Field(min_length=1, description="Model name as the router model knows it.")
    price_input: float | None = Field(None, ge=0, description="USD per million input tokens; default: catalog")
    price_output: float | None = Field(None, ge=0, description="USD per million output tokens; default: catalog")


class Rule(BaseModel):
    """When every condition given matches, the action applies. Conditions left out match anything.

    Rules are read in file order: the first matching pin decides; every matching min_tier /
    max_tier narrows the tiers the profile's mode may choose from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    # conditions
    workflow: list[str] | None = None
    stage: list[str] | None = None
    tenant: list[str] | None = None
    min_tokens: int | None = Field(None, ge=0, description="prompt at least this many tokens")
    max_tokens: int | None = Field(None, ge=0, description="prompt at most this many tokens")
    pattern: str | None = Field(None, description="regular expression searched in the prompt")
    ignore_case: bool = False
    # actions: exactly one
    pin_tier: str | None = None
    pin_model: str | None = None
    min_tier: str | None = None
    max_tier: str | None = None

    @field_validator("workflow", "stage", "tenant", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_action(self) -> Rule:
        actions = [a for a in ("pin_tier", "pin_model", "min_tier", "max_tier") if getattr(self, a) is not None]
        if len(actions) != 1:
            raise ValueError(f"a rule needs exactly one of pin_tier, pin_model, min_tier, max_tier; got {actions}")
        return self

    @property
    def action(self) -> tuple[str, str]:
        for a in ("pin_tier", "pin_model", "min_tier", "max_tier"):
            if (v := getattr(self, a)) is not None:
                return a, v
        raise AssertionError("validated to have one action. This is a bug.")

    def compiled(self) -> re.Pattern[str] | None:
        return re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0) if self.pattern else None

    def matches(self, workflow: str, stage: str, tenant: str, tokens: int, text: str,
                pattern: re.Pattern[str] | None) -> bool:
        return (
            (self.workflow is None or workflow in self.workflow)
            and (self.stage is None or stage in self.stage)
            and (self.tenant is None or tenant in self.tenant)
            and (self.min_tokens is None or tokens >= self.min_tokens)
            and (self.max_tokens is None or tokens <= self.max_tokens)
            and (pattern is None or pattern.search(text) is not None)
        )


Mode = Literal["floor", "share", "budget", "rework"]
assert set(Mode.__args__) == set(MODES)  # type: ignore[attr-defined]


class Profile(BaseModel):
    """One deployment's routing policy. Tiers are ordered cheap to expensive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    tiers: tuple[Tier, ...] = Field(min_length=1)
    mode: Mode = Field("floor", description="floor | share | budget | rework (see docs/profiles.md)")
    floor: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Quality floor: in mode floor, and for escalations, the cheapest tier clearing it answers.",
    )
    shares: dict[str, float] | None = Field(
        None, description="mode share: target share of traffic per tier (all tiers, or the last one only)"
    )
    floors: tuple[float, ...] | None = Field(
        None, description="mode share: per-tier floors that meet `shares`, written by calibrate"
    )
    budget_per_1k: float | None = Field(None, gt=0, description="mode budget: USD per 1,000 requests")
    budget_lambda: float | None = Field(
        None, ge=0, description="mode budget: price of quality that meets the budget, written by calibrate"
    )
    rework_cost: float | None = Field(None, ge=0, description="mode rework: USD a failed answer costs")
    expected_output_tokens: int = Field(300, ge=0, le=1_000_000, description="completion length for costs")
    max_escalations: int = Field(2, ge=0, description="escalations allowed in one chain")
    rules: tuple[Rule, ...] = ()
    exploration_rate: float = Field(
        0.0, ge=0.0, le=0.5,
        description="share of requests sent to a random allowed tier, with the propensity logged (off-policy eval)",
    )
    cascade_margin: float | None = Field(
        None, gt=0.0, le=1.0,
        description="run the model version's cheap first stage (the static encoder) first, and its main "
        "encoder only for requests whose decision would change if every tier's quality moved by this much",
    )
    store_prompts: bool = Field(False, description="keep raw prompts in the decision log (off by default)")
    pinned_prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="(input, output) prices of pin_model models, filled from the catalog"
    )
    calibrated: dict[str, Any] | None = Field(None, description="what calibrate measured, for the record")
    version: str = Field("", description="Content hash of the files it came from.")

    @field_validator("tiers")
    @classmethod
    def _unique_tier_names(cls, tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
        names = [t.name for t in tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique, repeated: {dupes}")
        return tiers

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        names = self.tier_names
        for i, rule in enumerate(self.rules):
            action, value = rule.action
            if action != "pin_model" and value not in names:
                raise ValueError(f"rules.{i}.{action}: {value!r} is not a tier of this profile: {list(names)}")
        if self.mode == "share":
            if not self.shares:
                raise ValueError("mode share needs `shares`, e.g. shares = { frontier = 0.2 }")
            unknown = sorted(set(self.shares) - set(names))
            if unknown:
                raise ValueError(f"shares: unknown tiers {unknown}; tiers: {list(names)}")
            if any(not 0.0 <= v <= 1.0 for v in self.shares.values()):
                raise ValueError(f"shares: every share must be in [0, 1], got {self.shares}")
            if set(self.shares) == set(names):
                if abs(sum(self.shares.values()) - 1.0) > 1e-6:
                    raise ValueError(f"shares: unreachable target, all tiers' shares must sum to 1, got {self.shares}")
            elif set(self.shares) != {names[-1]}:
                raise ValueError(f"shares: give a share for every tier, or for the last tier ({names[-1]!r}) only")
            if self.floors is None:
                raise ValueError(
                    f"floors: missing; run `python -m training calibrate --profile {self.name} --prompts FILE` "
                    "to compute the floors that meet `shares`"
                )
            if len(self.floors) != len(names):
                raise ValueError(f"floors: one per tier ({len(names)}), got {len(self.floors)}")
        if self.mode == "budget":
            if self.budget_per_1k is None:
                raise ValueError("mode budget needs `budget_per_1k` (USD per 1,000 requests)")
            if self.budget_lambda is None:
                raise ValueError(
                    f"budget_lambda: missing; run `python -m training calibrate --profile {self.name} --prompts FILE`"
                )
        if self.mode == "rework" and self.rework_cost is None:
            raise ValueError("mode rework needs `rework_cost` (USD a failed answer costs)")
        return self

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(t.model for t in self.tiers)

    def tier_index(self, name: str) -> int:
        return self.tier_names.index(name)

    @property
    def prices(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(input, output) USD per million tokens per tier; priced() has filled them in."""
        return (
            tuple(t.price_input or 0.0 for t in self.tiers),
            tuple(t.price_output or 0.0 for t in self.tiers),
        )

    def share_targets(self) -> list[float] | None:
        """Target shares per tier when all are given; None when only the last tier's is."""
        if not self.shares or set(self.shares) != set(self.tier_names):
            return None
        return [self.shares[n] for n in self.tier_names]


def priced(path: Path, profile: Profile, prices: dict[str, Price]) -> Profile:
    """The profile with every tier's price filled in from the catalog; ProfileError when a tier has
    no price, a pinned model is not in the catalog, or a budget is below the cheapest tier's cost."""
    tiers = []
    for i, t in enumerate(profile.tiers):
        listed = prices.get(t.model)
        pin = t.price_input if t.price_input is not None else (listed.input if listed else None)
        pout = t.price_output if t.price_output is not None else (listed.output if listed else None)
        if pin is None or pout is None:
            raise ProfileError(
                f"{path}: profiles.{profile.name}.tiers.{i}: model {t.model!r} has no price: add it to the "
                "price catalog or set price_input and price_output on the tier"
            )
        tiers.append(t.model_copy(update={"price_input": pin, "price_output": pout}))
    for i, rule in enumerate(profile.rules):
        if rule.pin_model is not None and rule.pin_model not in prices:
            raise ProfileError(
                f"{path}: profiles.{profile.name}.rules.{i}.pin_model: {rule.pin_model!r} is not in the price catalog"
            )
    # "cheap to expensive" is what floor and share modes rely on: say so when prices disagree
    per_request = [(t.price_input or 0.0) * 1000 + (t.price_output or 0.0) * profile.expected_output_tokens
                   for t in tiers]
    for a, b in zip(range(len(tiers)), range(1, len(tiers)), strict=False):
        if per_request[a] > per_request[b]:
            log.warning("%s: profiles.%s: tier %r costs more than the next tier %r at list prices; tiers should "
                        "be ordered cheap to expensive", path, profile.name, tiers[a].name, tiers[b].name)
    pinned = {r.pin_model: (prices[r.pin_model].input, prices[r.pin_model].output)
              for r in profile.rules if r.pin_model is not None}
    out = profile.model_copy(update={"tiers": tuple(tiers), "pinned_prices": pinned})
    if out.mode == "budget" and out.budget_per_1k is not None:
        cheapest = min(t.price_output or 0.0 for t in out.tiers) * out.expected_output_tokens / USD_PER_MILLION * 1000
        if out.budget_per_1k < cheapest:
            raise ProfileError(
                f"{path}: profiles.{out.name}.budget_per_1k: unreachable target: {out.budget_per_1k} USD per 1,000 "
                f"requests is below the cheapest tier's output cost alone ({cheapest:.4g})"
            )
    return out


def load_profiles(
    path: Path, known_models: Iterable[str] | None = None, prices_path: Path | None = None
) -> dict[str, Profile]:
    """Parse and validate a profiles file; with `known_models`, reject unknown models. Tier prices
    come from the price catalog the file names (`prices = "prices.toml"`, relative to the file),
    or `prices_path`; a tier may set its own. The version hashes both files."""
    doc, raw = _read_toml(path, "profiles file")
    prices: dict[str, Price] = {}
    digest = hashlib.sha256(raw)
    prices_path = prices_path or catalog_path(path, doc)
    if prices_path is not None:
        if not prices_path.is_file():
            raise ProfileError(f"{path}: prices: cannot read price catalog {prices_path}: no such file")
        prices = load_prices(prices_path)
        digest.update(prices_path.read_bytes())
    version = digest.hexdigest()[:12]
    tables = doc.get("profiles")
    if not isinstance(tables, dict) or not tables:
        raise ProfileError(f"{path}: needs at least one [profiles.<name>] table")
    known = set(known_models) if known_models is not None else None
    profiles: dict[str, Profile] = {}
    extra = sorted(set(doc) - {"profiles", "prices"})
    if extra:
        raise ProfileError(f"{path}: {extra[0]}: unknown top-level key; expected `prices` and [profiles.<name>]")
    for name, body in tables.items():
        if not isinstance(body, dict):
            raise ProfileError(f"{path}: profiles.{name} must be a table")
        try:
            profile = Profile(name=name, version=version, **body)
        except ValidationError as e:
            raise ProfileError(_validation_message(path, f"profiles.{name}", e)) from e
        except TypeError as e:  # e.g. a key given twice as a keyword
            raise ProfileError(f"{path}: profiles.{name}: {e}") from e
        if known is not None:
            check_models(path, profile, known)
        profiles[name] = priced(path, profile, prices)
    return profiles


def catalog_path(path: Path, doc: dict[str, Any] | None = None) -> Path | None:
    """The price catalog a profiles file names (top-level `prices`), resolved against its folder."""
    if doc is None:
        doc, _ = _read_toml(path, "profiles file")
    ref = doc.get("prices")
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref:
        raise ProfileError(f"{path}: prices: must be the path of a price catalog file")
    return (path.parent / ref).resolve()


def check_models(path: Path, profile: Profile, known: set[str]) -> None:
    for i, tier in enumerate(profile.tiers):
        if tier.model not in known:
            raise ProfileError(
                f"{path}: profiles.{profile.name}.tiers.{i}.model: unknown model "
                f"{tier.model!r}; the router model knows {sorted(known)}"
            )


class UnknownProfile(KeyError):
    """A request named a profile this server does not have."""


class ProfileSet:
    """The profiles a server routes with, and the one used when a request names none."""

    def __init__(self, profiles: dict[str, Profile], default: str, source: Path | None = None) -> None:
        if default not in profiles:
            raise ProfileError(
                f"{source or 'profiles'}: default profile {default!r} is not defined; "
                f"defined: {sorted(profiles)}"
            )
        self.profiles = profiles
        self.default = default
        self.source = source

    @property
    def version(self) -> str:
        return self.profiles[self.default].version

    def get(self, name: str) -> Profile:
        try:
            return self.profiles[name or self.default]
        except KeyError:
            raise UnknownProfile(name) from None

    @classmethod
    def load(
        cls, path: Path, default: str, known_models: Iterable[str] | None = None, prices_path: Path | None = None
    ) -> ProfileSet:
        """Load a profiles file. With `known_models`, the default profile must use only known
        models (else ProfileError); other profiles that name an unknown model are left out with
        a warning, so one file can serve model versions that know different models."""
        profiles = load_profiles(path, prices_path=prices_path)
        if known_models is not None:
            known = set(known_models)
            for name in list(profiles):
                try:
                    check_models(path, profiles[name], known)
                except ProfileError as e:
                    if name == default:
                        raise
                    log.warning("profile %r left out: %s", name, e)
                    del profiles[name]
        return cls(profiles, default, path)


class LiveProfiles:
    """The server's current ProfileSet, reloaded when the profiles file or its price catalog
    changes. A reload validates the new files whole and swaps in one assignment, so a request sees
    either the old set or the new one, never half of each; a file that fails to load is logged and
    the last good set stays."""

    def __init__(self, path: Path, default: str, known_models: Iterable[str] | None = None) -> None:
        self.path = path
        self.default = default
        self.known_models = list(known_models) if known_models is not None else None
        self._seen = self._fingerprint()
        self.current = ProfileSet.load(path, default, self.known_models)
        self.last_error: str | None = None

    def _files(self) -> list[Path]:
        try:
            ref = catalog_path(self.path)
        except ProfileError:
            ref = None
        return [self.path] + ([ref] if ref is not None else [])

    def _fingerprint(self) -> tuple[tuple[int, int], ...]:
        out = []
        for f in self._files():
            try:
                st = f.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def changed(self) -> bool:
        return self._fingerprint() != self._seen

    def reload(self) -> bool:
        """Load the files again; True when a new version was swapped in."""
        self._seen = self._fingerprint()
        try:
            fresh = ProfileSet.load(self.path, self.default, self.known_models)
        except ProfileError as e:
            self.last_error = str(e)
            log.error("profiles not reloaded, keeping version %s: %s", self.current.version, e)
            return False
        self.last_error = None
        if fresh.version == self.current.version:
            return False
        old = self.current.version
        self.current = fresh
        log.info("profiles reloaded: version %s -> %s (%s)", old, fresh.version, sorted(fresh.profiles))
        return True
