"""``loraplex-server``: wires settings, base model and engine together; owns start-up and graceful shutdown."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from loraplex.server.config import settings_from_argv
from loraplex.server.engine.engine import Engine, describe
from loraplex.server.model.loader import load_base

log = logging.getLogger("loraplex.server")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_argv(argv)
    base = load_base(settings.model)
    engine = Engine(base, settings)
    engine.start()
    log.info("engine started: %s", describe(engine))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    engine.begin_drain()
    engine.wait_idle(settings.server.grace_period_s)
    engine.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
