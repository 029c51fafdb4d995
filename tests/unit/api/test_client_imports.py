"""The client stays light: generated stubs and grpc only, never torch or the server package."""

from __future__ import annotations

import subprocess
import sys


def test_the_client_and_cli_import_neither_torch_nor_the_server() -> None:
    probe = (
        "import sys\n"
        "import loraplex.client, loraplex.client.cli\n"
        "heavy = ('torch', 'transformers')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('loraplex.server')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
