"""Text for the terminal (aligned tables, key/value blocks, sizes) and JSON for scripts, from the client's types."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from loraplex.client.types import Adapter, AdapterList, Generation, ServerStatus, StreamChunk


def to_json(value: Any) -> str:
    """One line of JSON for a result dataclass (or a list of them)."""

    def plain(item: Any) -> Any:
        if isinstance(item, datetime):
            return item.isoformat()
        raise TypeError(f"cannot write {type(item).__name__} as JSON")

    data = [dataclasses.asdict(v) for v in value] if isinstance(value, list) else dataclasses.asdict(value)
    return json.dumps(data, default=plain, ensure_ascii=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    value = nbytes / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


CHANGED_MARK = "*"
CHANGED_NOTE = (
    f"{CHANGED_MARK} its files changed on disk since this version was read: 'loraplex adapters load ID' serves them"
)


def _adapter_row(a: Adapter) -> list[str]:
    pinned = "yes" if a.pinned else "no"
    if a.loaded_at is None:  # never loaded: only on disk (or loading for the first time)
        return [a.adapter_id, "-", "-", a.tier, pinned, "-", "-", "-"]
    return [
        a.adapter_id,
        f"{a.version}{CHANGED_MARK if a.files_changed else ''}",
        str(a.rank),
        a.tier,
        pinned,
        size(a.size_bytes),
        str(a.requests_served),
        a.loaded_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
    ]


def adapters_table(adapters: Sequence[Adapter]) -> str:
    """The adapters, one row each ("-" where one was never loaded), with a note under a version marked changed."""
    if not adapters:
        return "no adapters: none in memory, none under the adapter roots"
    headers = ["ADAPTER", "VERSION", "RANK", "TIER", "PINNED", "SIZE", "SERVED", "LOADED AT"]
    text = table(headers, [_adapter_row(a) for a in adapters])
    return f"{text}\n{CHANGED_NOTE}" if any(a.files_changed for a in adapters) else text


def truncation_note(listing: AdapterList) -> str:
    return (
        f"showing {len(listing)} of {listing.total} adapters (those in memory first): the list stops at --limit or "
        "at the server's adapters.list_limit"
    )


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in pairs)


def adapter_details(a: Adapter) -> str:
    return key_values(
        [
            ("adapter", a.adapter_id),
            ("version", str(a.version)),
            ("content hash", a.content_hash),
            ("rank", str(a.rank)),
            ("target modules", ", ".join(a.target_modules)),
            ("DoRA", "yes" if a.use_dora else "no"),
            ("size", size(a.size_bytes)),
            ("tier", a.tier),
            ("pinned", "yes" if a.pinned else "no"),
            ("loaded at", a.loaded_at.astimezone().isoformat(timespec="seconds") if a.loaded_at else "-"),
            ("requests served", str(a.requests_served)),
            ("files on disk", "changed since this version was read" if a.files_changed else "as read"),
        ]
    )


def status_details(s: ServerStatus) -> str:
    return key_values(
        [
            ("version", s.version),
            ("base model", s.base_model),
            ("accepting", "yes" if s.accepting else "no"),
            ("running requests", str(s.running_requests)),
            ("waiting requests", str(s.waiting_requests)),
            ("active streams", str(s.active_streams)),
            ("KV cache usage", f"{s.kv_cache_usage:.1%}"),
            ("adapters on device", str(s.adapters_on_device)),
            ("adapters on host", str(s.adapters_on_host)),
        ]
    )


def summary(result: Generation | StreamChunk) -> str:
    """One line about a finished generation: who served it, how many tokens, why it stopped, how long it took."""
    served, usage, timings = result.served_by, result.usage, result.timings
    assert served is not None and usage is not None and timings is not None
    who = f"adapter {served.adapter_id} v{served.adapter_version}" if served.adapter_id else "base model"
    return (
        f"[{who} · {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens · "
        f"finish: {result.finish_reason} · {timings.total:.2f} s, first token {timings.time_to_first_token:.2f} s]"
    )
