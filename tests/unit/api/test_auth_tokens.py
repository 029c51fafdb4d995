"""The tokens file, tenants' glob patterns and bearer-token authentication."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplex.server.api.auth import OPEN_ACCESS, AuthConfigError, Tenant, TokenTable, current_tenant
from loraplex.server.api.errors import PermissionDenied, Unauthenticated

TOKEN_A = "alpha-0123456789abcdef"
TOKEN_B = "bravo-0123456789abcdef"


@pytest.fixture
def table(tmp_path: Path) -> TokenTable:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                TOKEN_A: {"tenant": "team-a", "adapters": ["team-a/*", "base"], "routes": ["ab-*"], "admin": True},
                TOKEN_B: {"tenant": "team-b", "adapters": ["shared-?"]},
            }
        )
    )
    return TokenTable.load(path)


def test_tokens_map_to_their_tenants(table: TokenTable) -> None:
    assert len(table) == 2
    assert table.lookup(TOKEN_A) == Tenant("team-a", ("team-a/*", "base"), ("ab-*",), admin=True)
    assert table.lookup(TOKEN_B) == Tenant("team-b", ("shared-?",), (), admin=False)
    assert table.lookup(TOKEN_A[:-1]) is None and table.lookup("") is None


@pytest.mark.parametrize(
    ("metadata", "tenant"),
    [
        ([("authorization", f"Bearer {TOKEN_A}")], "team-a"),
        ([("x-other", "1"), ("authorization", f"bearer  {TOKEN_B} ")], "team-b"),
        ([("authorization", f"Bearer {TOKEN_B}".encode())], "team-b"),
    ],
)
def test_bearer_metadata_authenticates(table: TokenTable, metadata: list[tuple[str, str | bytes]], tenant: str) -> None:
    assert table.authenticate(metadata).name == tenant


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ([], "missing bearer token"),
        ([("authorization", "Bearer")], "malformed"),
        ([("authorization", f"Token {TOKEN_A}")], "malformed"),
        ([("authorization", "Bearer wrong-token-000000000")], "invalid bearer token"),
    ],
)
def test_bad_metadata_is_unauthenticated(table: TokenTable, metadata: list[tuple[str, str]], says: str) -> None:
    with pytest.raises(Unauthenticated, match=says):
        table.authenticate(metadata)


def test_glob_patterns_decide_adapters_routes_and_admin() -> None:
    tenant = Tenant("t", ("team-a/*", "base"), ("ab-*",), admin=False)
    assert tenant.may_use_adapter("team-a/support") and tenant.may_use_adapter(None)
    assert not tenant.may_use_adapter("team-b/support") and not tenant.may_use_adapter("team-a")
    assert tenant.may_use_route("ab-checkout") and not tenant.may_use_route("checkout")
    with pytest.raises(PermissionDenied, match="tenant 't' may not use adapter 'team-b/x'"):
        tenant.check_adapter("team-b/x")
    with pytest.raises(PermissionDenied, match="may not call the admin RPC /x/Load"):
        tenant.check_admin("/x/Load")
    assert OPEN_ACCESS.may_use_adapter("anything/at/all") and OPEN_ACCESS.admin


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("[]", "must map bearer tokens to tenants"),
        ("{: [}", "cannot read the tokens file"),
        (
            yaml.safe_dump({"short": {"tenant": "x"}}),
            "entry #1 (tenant 'x'): the token must be a string of at least 16",
        ),
        (yaml.safe_dump({TOKEN_A: {"tenant": "x", "admins": True}}), "entry #1 (tenant 'x'): admins: Extra inputs"),
        (yaml.safe_dump({TOKEN_A: {"adapters": ["*"]}}), "entry #1: tenant: Field required"),
        (yaml.safe_dump({TOKEN_A: "team-a"}), "entry #1: entry: Input should be a valid dictionary"),
    ],
)
def test_bad_tokens_files_are_refused_without_showing_tokens(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(AuthConfigError) as raised:
        TokenTable.load(path)
    assert says in str(raised.value)
    assert TOKEN_A not in str(raised.value) and "short" not in str(raised.value).replace(str(path), "")


def test_the_tenant_of_an_unauthenticated_call_fails_closed() -> None:
    with pytest.raises(Unauthenticated):
        current_tenant()
