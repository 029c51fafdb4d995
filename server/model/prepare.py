"""``python -m loraplex.server.model.prepare``: converts the configured base model into the cache ahead of time."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from loraplex.server.config import default_cache_dir
from loraplex.server.model.embedded import EMBEDDED_NAME, resolve_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=EMBEDDED_NAME)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = default_cache_dir() if args.cache_dir is None else Path(args.cache_dir)
    print(resolve_model_dir(args.base_model, cache_dir))


if __name__ == "__main__":
    main()
