"""The tenants' virtual token counters (charges over weight, no banked credit for an idle tenant), their slot
shares, and which request a full server refuses."""

from __future__ import annotations

from loraplex.server.engine.fairness import InFlight, TenantShare


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


def test_slot_shares_follow_the_weights_of_the_live_tenants() -> None:
    share = TenantShare()
    assert share.slot_share("anyone", 8) == 8.0  # nobody live: the whole batch
    share.arrived("a", 1.0)
    assert share.slot_share("a", 8) == 8.0
    share.arrived("b", 3.0)
    share.arrived("b", 3.0)
    assert (share.slot_share("a", 8), share.slot_share("b", 8)) == (2.0, 6.0)
    share.left("b")
    share.left("b")
    assert share.slot_share("a", 8) == 8.0  # b gone: its weight no longer counts


def test_a_full_server_refuses_the_tenant_over_its_share_of_the_bound() -> None:
    flight = InFlight()
    for _ in range(6):  # max_running 4 + max_queue 2, all the flood's
        assert flight.refusal("flood", 1.0, 4, 2, fair=True) is None
        flight.add("flood", 1.0)
    refused = flight.refusal("flood", 1.0, 4, 2, fair=True)
    assert refused is not None and "engine.max_queue=2" in refused and "tenant 'flood'" in refused
    assert "retry later" in refused
    for _ in range(3):  # the light tenant's share of the bound: 6 x 1/2
        assert flight.refusal("light", 1.0, 4, 2, fair=True) is None
        flight.add("light", 1.0)
    assert flight.refusal("light", 1.0, 4, 2, fair=True) is not None  # at its share now
    assert flight.refusal("light", 1.0, 4, 2, fair=False) is not None
    assert flight.refusal("heavy", 5.0, 4, 2, fair=True) is None  # a new tenant of weight 5: share 6 x 5/7 = 4.3
    flight.remove("light")
    flight.remove("flood")
    assert flight.total == 7


def test_without_fair_share_a_full_server_refuses_everyone_and_the_total_never_passes_twice_the_bound() -> None:
    flight = InFlight()
    for _ in range(3):
        flight.add("flood", 1.0)
    refused = flight.refusal("light", 1.0, 2, 1, fair=False)
    assert refused is not None and "engine.max_running=2 + engine.max_queue=1" in refused
    for tenant in ("b", "c", "d"):  # each under its share, until twice the bound is in flight
        assert flight.refusal(tenant, 1.0, 2, 1, fair=True) is None
        flight.add(tenant, 1.0)
    assert flight.total == 6 and flight.refusal("e", 100.0, 2, 1, fair=True) is not None
