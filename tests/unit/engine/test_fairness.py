"""The tenants' virtual token counters: charges over weight, no banked credit for an idle tenant."""

from __future__ import annotations

from loraplex.server.engine.fairness import TenantShare


def test_counters_charge_tokens_over_the_weight() -> None:
    share = TenantShare()
    share.arrived("a")
    share.arrived("b")
    share.charge("a", 100, 1.0)
    share.charge("b", 100, 2.0)  # twice the weight: half the counter for the same tokens
    assert (share.level("a"), share.level("b")) == (100.0, 50.0)
    assert share.tenants == 2


def test_an_idle_tenant_comes_back_at_the_backlogged_minimum() -> None:
    share = TenantShare()
    for tenant in ("busy", "steady"):
        share.arrived(tenant)
    share.charge("busy", 900, 1.0)
    share.charge("steady", 300, 1.0)
    share.arrived("newcomer")  # never served: starts level with the least-served backlogged tenant
    assert share.level("newcomer") == 300.0
    share.charge("steady", 10, 1.0)
    share.left("steady")
    share.arrived("steady")  # back from idle: lifted to the backlogged minimum (300) only if below it
    assert share.level("steady") == 310.0  # already above the floor (300): kept, never lowered
    share.left("newcomer")
    share.arrived("newcomer")
    assert share.level("newcomer") == 310.0
    share.left("busy")
    share.left("steady")
    share.left("newcomer")
    assert share.tenants == 0
    share.arrived("busy")  # nobody backlogged: nothing to lift to
    assert share.level("busy") == 900.0
