"""Fair share across tenants: a virtual token counter per tenant weighs admission and preemption.

The choice is S-LoRA's fair scheduler, the *virtual token counter* (VTC: Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024). Every tenant has a counter of the tokens computed for it (prompt chunks and decoded
tokens alike, prefix-cache hits free, as they cost nothing), divided by its weight (``weight`` in the tokens file,
default 1). Admission takes the waiting sequence of the tenant with the lowest counter first (arrival order within a
tenant, preempted sequences still first); preemption takes the newest sequence of the tenant with the highest
counter among those it may take. So a tenant that floods the queue is served its share while a light tenant's
requests go ahead of its backlog. Counting tokens rather than requests (the equal-share variant) charges what a
request really costs the batch: a tenant of long prompts cannot take more by sending fewer, larger requests.

No banked credit: a tenant with nothing waiting or running that submits again has its counter lifted to the
lowest counter of the tenants that are backlogged, as VTC does, so idling does not buy a burst that starves the
others later. Requests without a tenant (the engine used directly) share one counter: their order stays FIFO.
"""

from __future__ import annotations

from collections import Counter


class TenantShare:
    """The tenants' counters and which tenants have sequences waiting or running."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = {}
        self._live: Counter[str] = Counter()  # sequences waiting or running per tenant

    def level(self, tenant: str) -> float:
        """The tenant's served tokens over its weight."""
        return self._counters.get(tenant, 0.0)

    def arrived(self, tenant: str) -> None:
        """A sequence of ``tenant`` joins the queue; a tenant that was idle starts at the backlogged minimum."""
        if not self._live[tenant]:
            floor = min((self.level(t) for t, live in self._live.items() if live), default=None)
            if floor is not None and self.level(tenant) < floor:
                self._counters[tenant] = floor
        self._live[tenant] += 1

    def left(self, tenant: str) -> None:
        """A sequence of ``tenant`` finished, failed or was cancelled."""
        self._live[tenant] -= 1
        if not self._live[tenant]:
            del self._live[tenant]

    def charge(self, tenant: str, tokens: int, weight: float) -> None:
        """``tokens`` computed for ``tenant`` (of tokens-file weight ``weight``)."""
        self._counters[tenant] = self.level(tenant) + tokens / weight

    @property
    def tenants(self) -> int:
        """Tenants with sequences waiting or running."""
        return len(self._live)
