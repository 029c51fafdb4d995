"""Bearer-token auth: the tokens file, tenants and what each may use, and the tenant of the current RPC.

The tokens file (``auth.tokens_file``) is YAML mapping each token to its tenant::

    "9f2c…a17e":                      # the bearer token (at least 16 characters)
      tenant: team-a
      adapters: ["team-a/*", "base"]  # glob patterns of adapter ids; "base" is the base model
      routes: ["checkout-*"]          # glob patterns of A/B route names
      admin: false                    # may load and unload adapters, set and delete routes
      weight: 1                       # its fair share of the engine relative to other tenants (default 1)

Tokens are kept only as SHA-256 digests and compared in constant time against every entry; they never appear in
logs or error messages (a bad entry is named by its position and tenant).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplex.server.api.errors import PermissionDenied, Unauthenticated
from loraplex.server.routing.routes import BASE_MODEL

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...]  # glob patterns over adapter ids (BASE_MODEL for the base model)
    routes: tuple[str, ...]  # glob patterns over route names
    admin: bool
    weight: float = 1.0  # fair-share weight (server/engine/fairness.py): twice the weight, twice the tokens

    def may_use_adapter(self, adapter_id: str | None) -> bool:
        name = adapter_id or BASE_MODEL
        return any(fnmatchcase(name, pattern) for pattern in self.adapters)

    def may_use_route(self, route: str) -> bool:
        return any(fnmatchcase(route, pattern) for pattern in self.routes)

    def check_adapter(self, adapter_id: str | None) -> None:
        if not self.may_use_adapter(adapter_id):
            raise PermissionDenied(f"tenant '{self.name}' may not use adapter '{adapter_id or BASE_MODEL}'")

    def check_route(self, route: str) -> None:
        if not self.may_use_route(route):
            raise PermissionDenied(f"tenant '{self.name}' may not use route '{route}'")

    def check_admin(self, method: str) -> None:
        if not self.admin:
            raise PermissionDenied(f"tenant '{self.name}' may not call the admin RPC {method}")


OPEN_ACCESS = Tenant(name="anonymous", adapters=("*",), routes=("*",), admin=True)  # auth off: everything allowed


class AuthConfigError(ValueError):
    """The tokens file cannot be used; the message names the entry (never the token) and the problem."""


class _TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(min_length=1)
    adapters: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    admin: bool = False
    weight: float = Field(1.0, gt=0, le=1000)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Token digests → tenants."""

    def __init__(self, entries: Sequence[tuple[str, Tenant]]) -> None:
        self._entries = [(_digest(token), tenant) for token, tenant in entries]

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise AuthConfigError(f"cannot read the tokens file {path}: {exc}") from exc
        if not isinstance(data, dict) or not data:
            raise AuthConfigError(f"tokens file {path} must map bearer tokens to tenants (see server/api/auth.py)")
        entries: list[tuple[str, Tenant]] = []
        for position, (token, spec) in enumerate(data.items(), start=1):
            tenant_name = spec.get("tenant") if isinstance(spec, dict) else None
            named = f"entry #{position}" + (f" (tenant {tenant_name!r})" if tenant_name is not None else "")
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise AuthConfigError(
                    f"tokens file {path}, {named}: the token must be a string of at least {MIN_TOKEN_LENGTH} characters"
                )
            try:
                parsed = _TenantSpec.model_validate(spec)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
                raise AuthConfigError(f"tokens file {path}, {named}: {problems}") from None
            entries.append((token, Tenant(parsed.tenant, parsed.adapters, parsed.routes, parsed.admin, parsed.weight)))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Tenant | None:
        """The tenant of ``token``; every entry is compared, in constant time, whether or not one matched."""
        presented = _digest(token)
        found: Tenant | None = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, presented):
                found = tenant
        return found

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Tenant:
        """The tenant of the ``authorization: Bearer <token>`` metadata, or Unauthenticated."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            raise Unauthenticated("missing bearer token: send the metadata 'authorization: Bearer <token>'")
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata: use 'Bearer <token>'")
        tenant = self.lookup(token.strip())
        if tenant is None:
            raise Unauthenticated("invalid bearer token")
        return tenant


_CURRENT: ContextVar[Tenant | None] = ContextVar("loraplex_tenant", default=None)


def set_current_tenant(tenant: Tenant) -> None:
    """Records the caller of this RPC (each RPC runs in its own asyncio task, so this never leaks to another)."""
    _CURRENT.set(tenant)


def current_tenant() -> Tenant:
    tenant = _CURRENT.get()
    if tenant is None:  # fail closed if a servicer ever runs without the auth interceptor
        raise Unauthenticated("the call was not authenticated")
    return tenant
