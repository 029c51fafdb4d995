"""Fixtures for engine tests: engines over the session's base model, and a runner for concurrent requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loraplex.server.config import load_settings
from loraplex.server.core.errors import EngineError
from loraplex.server.core.events import EngineListener
from loraplex.server.core.types import Finished, GenerationRequest, TokenDelta
from loraplex.server.engine.engine import Engine
from loraplex.server.model.loader import LoadedBase


@dataclass
class Outcome:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: Finished | None
    error: EngineError | None
    finished_at: float


def make_engine(
    base: LoadedBase, roots: Sequence[Path], listener: EngineListener | None = None, **sections: dict[str, Any]
) -> Engine:
    overrides: dict[str, Any] = {"adapters": {"roots": [str(r) for r in roots]}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    engine = Engine(base, load_settings(environ={}, overrides=overrides), listener)
    engine.start()
    return engine


@pytest.fixture
def engine_factory(base: LoadedBase) -> Iterator[Any]:
    engines: list[Engine] = []

    def factory(roots: Sequence[Path], listener: EngineListener | None = None, **sections: dict[str, Any]) -> Engine:
        engine = make_engine(base, roots, listener, **sections)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.stop()


async def collect(engine: Engine, request: GenerationRequest) -> Outcome:
    text, ids, logprobs = "", [], []
    finished = None
    try:
        async for event in engine.generate(request):
            if isinstance(event, TokenDelta):
                text += event.text
                ids += event.token_ids
                logprobs += event.logprobs or ()
            else:
                finished = event
        error = None
    except EngineError as exc:
        error = exc
    return Outcome(request.request_id, text, ids, logprobs, finished, error, asyncio.get_running_loop().time())


def run_all(engine: Engine, requests: Sequence[GenerationRequest]) -> list[Outcome]:
    async def main() -> list[Outcome]:
        return list(await asyncio.gather(*(collect(engine, r) for r in requests)))

    return asyncio.run(main())
