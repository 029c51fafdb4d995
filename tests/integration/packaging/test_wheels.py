"""Both distributions as wheels in fresh virtual environments: the light client brings no torch, and the server
wheel serves what the client's CLI asks of it.

The client venv installs ``loraplex-client`` with its dependencies (grpcio, protobuf) like a user would. The server
venv installs both wheels without dependencies and borrows this environment's third-party packages through a
``.pth`` line (installing torch and transformers again would take minutes and gigabytes, and proves nothing about
our packaging); neither venv can see the repository or its editable installs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[3]
UV = str(Path(sys.executable).parent / "uv")
# grpcio needs typing-extensions; nothing else comes along (no torch, transformers, bitsandbytes, numpy).
CLIENT_DEPENDENCIES = {"loraplex-client", "grpcio", "grpcio-health-checking", "protobuf", "typing-extensions"}


def _run(*command: str, cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _venv(path: Path) -> Path:
    _run(UV, "venv", "--quiet", "--python", sys.executable, str(path), cwd=path.parent)
    return path / "bin" / "python"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    for source in (ROOT / "clients", ROOT):
        _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source), cwd=out)
    built = {path.name.split("-")[0].replace("_", "-"): path for path in out.glob("*.whl")}
    assert set(built) == {"loraplex", "loraplex-client"}
    return built


def test_server_wheel_holds_every_module_once(wheels: dict[str, Path]) -> None:
    import zipfile

    names = {dist: {n for n in zipfile.ZipFile(path).namelist() if n.endswith(".py")} for dist, path in wheels.items()}
    expected_server = {
        f"loraplex/{room}/{p.relative_to(ROOT / room)}"
        for room in ("server", "trainer")
        for p in (ROOT / room).rglob("*.py")
    }
    expected_client = {
        f"loraplex/client/{p.relative_to(ROOT / 'clients/python')}" for p in (ROOT / "clients/python").rglob("*.py")
    }
    expected_client |= {
        f"loraplex/proto/{p.relative_to(ROOT / 'protos/gen')}" for p in (ROOT / "protos/gen").rglob("*.py")
    }
    assert names["loraplex"] == expected_server
    assert names["loraplex-client"] == expected_client
    assert not any(n.startswith("loraplex/__init__") for ns in names.values() for n in ns)  # a namespace


def test_fresh_venvs_serve_and_the_light_client_talks_to_them(wheels: dict[str, Path], tmp_path: Path) -> None:
    client_python = _venv(tmp_path / "client-venv")
    _run(UV, "pip", "install", "--quiet", "--python", str(client_python), str(wheels["loraplex-client"]), cwd=tmp_path)
    frozen = json.loads(_run(UV, "pip", "list", "--format", "json", "--python", str(client_python), cwd=tmp_path))
    assert {entry["name"] for entry in frozen} == CLIENT_DEPENDENCIES
    probe = (
        "import importlib.util as u; print([m for m in ('torch', 'transformers', 'bitsandbytes') if u.find_spec(m)])"
    )
    assert _run(str(client_python), "-c", probe, cwd=tmp_path).strip() == "[]"

    server_python = _venv(tmp_path / "server-venv")
    _run(
        UV,
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--python",
        str(server_python),
        *map(str, wheels.values()),
        cwd=tmp_path,
    )
    site = Path(
        _run(
            str(server_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = _run(
        str(server_python),
        "-c",
        "import loraplex.server.main as m, loraplex.client as c; print(m.__file__); print(c.__file__)",
        cwd=tmp_path,
    )
    assert all(line.startswith(str(site)) for line in where.split()), where

    bin_dir = server_python.parent
    help_text = _run(str(bin_dir / "loraplex-server"), "--help", cwd=tmp_path)
    assert "--engine.max-queue" in help_text and "--base-model" in help_text
    server = ServerProcess.start(
        tmp_path / "server.log", [ROOT / "adapters"], program=(str(bin_dir / "loraplex-server"),)
    )
    try:
        health = _run(str(client_python.parent / "loraplex"), "--target", server.target, "health", cwd=tmp_path)
        assert "loraplex.v1.Generation          SERVING" in health
        assert "inference.GRPCInferenceService  SERVING" in health
    finally:
        server.stop()
