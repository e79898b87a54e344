"""Deployment profiles: ordered tiers mapped to models, and the quality floor that picks among them."""

from __future__ import annotations

import hashlib
import logging
import tomllib
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Tier name, e.g. budget / mid / frontier.")
    model: str = Field(min_length=1, description="Model name as the router model knows it.")


class Profile(BaseModel):
    """One deployment's routing policy. Tiers are ordered cheap to expensive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    tiers: tuple[Tier, ...] = Field(min_length=1)
    threshold: float = Field(
        ge=0.0,
        le=1.0,
        description="Quality floor: the cheapest tier whose quality clears it answers.",
    )
    version: str = Field("", description="Content hash of the file it came from.")

    @field_validator("tiers")
    @classmethod
    def _unique_tier_names(cls, tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
        names = [t.name for t in tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique, repeated: {dupes}")
        return tiers

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(t.model for t in self.tiers)


def load_profiles(path: Path, known_models: Iterable[str] | None = None) -> dict[str, Profile]:
    """Parse and validate a profiles TOML file; with `known_models`, reject unknown models."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profiles file: {e}") from e
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e
    version = hashlib.sha256(raw).hexdigest()[:12]
    tables = doc.get("profiles")
    if not isinstance(tables, dict) or not tables:
        raise ProfileError(f"{path}: needs at least one [profiles.<name>] table")
    known = set(known_models) if known_models is not None else None
    profiles: dict[str, Profile] = {}
    for name, body in tables.items():
        if not isinstance(body, dict):
            raise ProfileError(f"{path}: profiles.{name} must be a table")
        try:
            profile = Profile(name=name, version=version, **body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ProfileError(f"{path}: profiles.{name}.{loc}: {err['msg']}") from e
        if known is not None:
            check_models(path, profile, known)
        profiles[name] = profile
    return profiles


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

    def get(self, name: str) -> Profile:
        try:
            return self.profiles[name or self.default]
        except KeyError:
            raise UnknownProfile(name) from None

    @classmethod
    def load(cls, path: Path, default: str, known_models: Iterable[str] | None = None) -> ProfileSet:
        """Load a profiles file. With `known_models`, the default profile must use only known
        models (else ProfileError); other profiles that name an unknown model are left out with
        a warning, so one file can serve model versions that know different models."""
        profiles = load_profiles(path)
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
