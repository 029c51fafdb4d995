"""A route's definition: weighted variants (each an adapter or the base model), a control, a salt and an optional
shadow, validated in one place whether it comes from the routes file or from ``SetRoute``.

A spec is a plain mapping (the YAML shape)::

    control: v1                      # optional, default: the first variant
    salt: support-bot                # optional, default: the route name; a new salt reshuffles every user
    variants:
      - {name: v1, adapter: ticket-triage-v1, weight: 50}
      - {name: v2, adapter: ticket-triage-v2, weight: 50}
    shadow: {adapter: base, percent: 10}   # optional: mirror 10 % of requests, discard the answers

Weights are percentages in steps of 0.01 (one step is one of the 10,000 buckets) and sum to 100.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraplex.server.lora.sources import InvalidAdapterId, validate_adapter_id
from loraplex.server.routing.errors import InvalidRoute

BUCKETS = 10_000  # sticky buckets per route; a weight of 0.01 % is one bucket
BASE_MODEL = "base"  # the base model's name in routes (as in tenant patterns and OIP model names)
MAX_VARIANTS = 32
MAX_NAME_LENGTH = 128
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Variant:
    name: str
    adapter: str  # adapter id, or BASE_MODEL
    weight: float  # percent of the route's traffic

    @property
    def adapter_id(self) -> str | None:
        """The engine's adapter id (None = the base model)."""
        return None if self.adapter == BASE_MODEL else self.adapter

    @property
    def buckets(self) -> int:
        return round(self.weight * BUCKETS / 100)


@dataclass(frozen=True)
class Shadow:
    adapter: str  # adapter id, or BASE_MODEL
    percent: float  # of the route's requests mirrored to it, (0, 100]

    @property
    def adapter_id(self) -> str | None:
        return None if self.adapter == BASE_MODEL else self.adapter

    @property
    def label(self) -> str:
        """The variant label of mirrored requests in metrics ("shadow:<adapter>")."""
        return f"shadow:{self.adapter}"


@dataclass(frozen=True)
class Route:
    name: str
    variants: tuple[Variant, ...]
    control: str
    salt: str
    shadow: Shadow | None = None

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def adapters(self) -> tuple[str, ...]:
        """Every adapter the route sends traffic to (variants, then the shadow), without BASE_MODEL."""
        names = [v.adapter for v in self.variants] + ([self.shadow.adapter] if self.shadow else [])
        return tuple(dict.fromkeys(name for name in names if name != BASE_MODEL))

    def same_experiment(self, other: Route) -> bool:
        """True when only the shadow differs: users, variants and weights are those of ``other``."""
        return (self.variants, self.control, self.salt) == (other.variants, other.control, other.salt)

    def to_spec(self) -> dict[str, Any]:
        """The YAML shape of the route (without its name)."""
        spec: dict[str, Any] = {
            "control": self.control,
            "salt": self.salt,
            "variants": [{"name": v.name, "adapter": v.adapter, "weight": v.weight} for v in self.variants],
        }
        if self.shadow is not None:
            spec["shadow"] = {"adapter": self.shadow.adapter, "percent": self.shadow.percent}
        return spec


def _adapter_name(value: str) -> str:
    if value != BASE_MODEL:
        try:
            validate_adapter_id(value)
        except InvalidAdapterId as exc:
            raise ValueError(f"{exc} (or '{BASE_MODEL}' for the base model)") from None
    return value


class _VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    adapter: str = Field(min_length=1)
    weight: float

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _VARIANT_NAME.match(value):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        return _adapter_name(value)

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0 or value > 100:
            raise ValueError("a weight is a percentage from 0 to 100")
        if abs(value * BUCKETS / 100 - round(value * BUCKETS / 100)) > _WEIGHT_TOLERANCE:
            raise ValueError(f"weights go in steps of 0.01 (one of {BUCKETS} buckets); got {value}")
        return value


class _ShadowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = Field(min_length=1)
    percent: float

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        return _adapter_name(value)

    @field_validator("percent")
    @classmethod
    def _percent(cls, value: float) -> float:
        if not math.isfinite(value) or not 0 < value <= 100:
            raise ValueError("the shadow percent is in (0, 100]: the share of requests mirrored to the shadow")
        return value


class _RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: tuple[_VariantSpec, ...] = Field(min_length=1, max_length=MAX_VARIANTS)
    control: str | None = None
    salt: str | None = Field(None, min_length=1, max_length=MAX_NAME_LENGTH)
    shadow: _ShadowSpec | None = None


def validate_route_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not _ROUTE_NAME.match(name) or name == BASE_MODEL:
        raise InvalidRoute(
            f"route name {name!r} is not valid: use 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' and '-' in "
            f"'/'-separated parts, each starting with a letter or digit (and not '{BASE_MODEL}')"
        )
    return name


def _check_variants(name: str, spec: _RouteSpec) -> list[str]:
    problems: list[str] = []
    names = [v.name for v in spec.variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"variant names must be unique (repeated: {', '.join(repeated)})")
    total = sum(v.weight for v in spec.variants)
    if abs(total - 100) > _WEIGHT_TOLERANCE:
        weights = " + ".join(f"{v.name}={v.weight:g}" for v in spec.variants)
        problems.append(f"variant weights must sum to 100 (got {weights} = {total:g})")
    if spec.control is not None and spec.control not in names:
        problems.append(f"control {spec.control!r} is not one of the variants ({', '.join(names)})")
    return problems


def route_from_spec(name: str, spec: Mapping[str, Any]) -> Route:
    """The validated route ``name`` of ``spec``; InvalidRoute lists every problem and how to fix it."""
    validate_route_name(name)
    try:
        parsed = _RouteSpec.model_validate(spec)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'route'}: {err['msg']}" for err in exc.errors()]
        raise InvalidRoute(f"route '{name}': " + "; ".join(problems)) from None
    problems = _check_variants(name, parsed)
    if problems:
        raise InvalidRoute(f"route '{name}': " + "; ".join(problems))
    variants = tuple(Variant(v.name, v.adapter, v.weight) for v in parsed.variants)
    shadow = None if parsed.shadow is None else Shadow(parsed.shadow.adapter, parsed.shadow.percent)
    return Route(
        name=name,
        variants=variants,
        control=parsed.control or variants[0].name,
        salt=parsed.salt or name,
        shadow=shadow,
    )
