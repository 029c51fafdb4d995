"""Fair share across tenants: a virtual token counter per tenant orders admission and preemption, each tenant's
weighted share of the running batch is reclaimed for it within a step, and a full server refuses the tenants over
their share of the queue first.

The choice is S-LoRA's fair scheduler, the *virtual token counter* (VTC: Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024). Every tenant has a counter of the tokens computed for it (prompt chunks and decoded
tokens alike, prefix-cache hits free, as they cost nothing), divided by its weight (``weight`` in the tokens file,
default 1). Admission takes the waiting sequence of the tenant with the lowest counter first (within a tenant,
preempted sequences first, then arrival order); preemption for KV blocks takes the newest sequence of the tenant
with the highest counter among those it may take. Counting tokens rather than requests (the equal-share variant)
charges what a request really costs the batch: a tenant of long prompts cannot take more by sending fewer, larger
requests.

Counters alone order the queue but cannot make room: when a flooding tenant holds every running slot, a light
tenant's request would wait for one of the flood's sequences to finish (a whole generation, many steps). So a
waiting sequence whose tenant runs fewer sequences than its *slot share* (``engine.max_running`` × its weight over
the weights of the tenants with sequences waiting or running) and whose counter is not above the other tenant's
*reclaims* a slot: the newest running sequence of the highest-counter tenant over its own slot share is preempted
(it resumes later, its prompt blocks usually still in the prefix cache) and the waiting one is admitted in the
same step. This is work-conserving: a tenant alone uses the whole batch, and gives back only what another tenant
comes to claim.

Refusals (:class:`InFlight`): requests in flight (running or queued) are bounded by ``engine.max_running +
engine.max_queue``. When that is full, a request of a tenant holding fewer than its weighted share of the bound is
still accepted (up to twice the bound in all), so a flood fills the queue with refusals of its own requests, not the
light tenants'. The check counts and compares only; it runs on the event loop before any other work.

No banked credit: a tenant with nothing waiting or running that submits again has its counter lifted to the
lowest counter of the tenants that are backlogged, as VTC does, so idling does not buy a burst that starves the
others later. Requests without a tenant (the engine used directly) share one counter: their order stays FIFO.
``engine.fair_share`` false turns all of this off (first come, first served; one bound for everyone).
"""

from __future__ import annotations

from collections import Counter


class TenantShare:
    """The tenants' counters and weights, and which tenants have sequences waiting or running."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = {}
        self._live: Counter[str] = Counter()  # sequences waiting or running per tenant
        self._weights: dict[str, float] = {}  # of the tenants in _live

    def level(self, tenant: str) -> float:
        """The tenant's served tokens over its weight."""
        return self._counters.get(tenant, 0.0)

    def arrived(self, tenant: str, weight: float = 1.0) -> None:
        """A sequence of ``tenant`` joins the queue; a tenant that was idle starts at the backlogged minimum."""
        if not self._live[tenant]:
            floor = min((self.level(t) for t, live in self._live.items() if live), default=None)
            if floor is not None and self.level(tenant) < floor:
                self._counters[tenant] = floor
        self._live[tenant] += 1
        self._weights[tenant] = weight

    def left(self, tenant: str) -> None:
        """A sequence of ``tenant`` finished, failed or was cancelled."""
        self._live[tenant] -= 1
        if not self._live[tenant]:
            del self._live[tenant]
            del self._weights[tenant]

    def charge(self, tenant: str, tokens: int, weight: float) -> None:
        """``tokens`` computed for ``tenant`` (of tokens-file weight ``weight``)."""
        self._counters[tenant] = self.level(tenant) + tokens / weight

    def slot_share(self, tenant: str, slots: int) -> float:
        """The tenant's weighted share of ``slots`` running slots among the tenants with sequences live."""
        total = sum(self._weights.values())
        return slots * self._weights.get(tenant, 0.0) / total if total else float(slots)

    @property
    def tenants(self) -> int:
        """Tenants with sequences waiting or running."""
        return len(self._live)


class InFlight:
    """Requests in flight (accepted and not finished) per tenant, and which new one a full server refuses."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._weights: dict[str, float] = {}
        self.total = 0

    def add(self, tenant: str, weight: float) -> None:
        self._counts[tenant] += 1
        self._weights[tenant] = weight
        self.total += 1

    def remove(self, tenant: str) -> None:
        self._counts[tenant] -= 1
        self.total -= 1
        if not self._counts[tenant]:
            del self._counts[tenant]
            del self._weights[tenant]

    def refusal(self, tenant: str, weight: float, max_running: int, max_queue: int, fair: bool) -> str | None:
        """Why a new request of ``tenant`` is refused, or None when it may be accepted: ``max_running +
        max_queue`` are in flight and (with ``fair``) the tenant already holds its weighted share of them, or twice
        that many are in flight."""
        bound = max_running + max_queue
        if self.total < bound:
            return None
        full = (
            f"{self.total} requests are running or queued "
            f"(engine.max_running={max_running} + engine.max_queue={max_queue})"
        )
        if not fair:
            return f"{full}; retry later"
        weights = {**self._weights, tenant: weight}
        share = bound * weight / sum(weights.values())
        held = self._counts[tenant]
        if held < share and self.total < 2 * bound:
            return None
        return f"{full}, {held} of them tenant '{tenant}''s (its fair share: {share:.1f}); retry later"
