"""Adapter affinity for scale-out: generation calls name their route (or adapter) in one metadata header.

A proxy in front of several replicas (Envoy ``ring_hash``/``maglev``, HAProxy ``balance hdr`` with ``hash-type
consistent``, both with a load bound) hashes on the header, so every request for one adapter lands on the same
replica and that replica's adapter cache stays hot, while different adapters still spread over the replicas. The
server ignores the header; calls for the base model send none, so a proxy spreads them freely.
"""

from __future__ import annotations

from loraplex.client.types import GenerateOptions

AFFINITY_HEADER = "x-loraplex-affinity"
Metadata = tuple[tuple[str, str], ...]  # gRPC call metadata: (key, value) pairs


def affinity_key(options: GenerateOptions) -> str | None:
    """The route when one is set (all its variants stay together), else the adapter id; None for the base model.

    Keys that are not printable ASCII cannot travel as gRPC metadata; they get no affinity (None).
    """
    key = options.get("route") or options.get("adapter")
    return key if key and key.isascii() and key.isprintable() else None


def affinity_metadata(options: GenerateOptions) -> Metadata:
    """The affinity header of a generation call, or nothing."""
    key = affinity_key(options)
    return ((AFFINITY_HEADER, key),) if key else ()
