"""The committed generated code matches the protos, and it imports inside ``loraplex.proto`` without clashing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_generated_code_is_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_modules_live_inside_loraplex_proto_only() -> None:
    probe = (
        "import sys\n"
        "from loraplex.proto.v1 import generation_pb2_grpc, adapters_pb2_grpc, server_pb2_grpc\n"
        "from loraplex.proto.inference import grpc_service_pb2_grpc\n"
        "bare = ('inference', 'v1')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bare or m.startswith('loraplex.v1')))\n"
        "print(generation_pb2_grpc.loraplex_dot_v1_dot_generation__pb2.GenerateRequest.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.splitlines() == ["[]", "loraplex.proto.v1.generation_pb2"]
