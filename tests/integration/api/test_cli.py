"""The ``loraplex`` CLI as a user runs it: streaming generation and chat, JSON for scripts, adapter admin, status,
health, and errors that say what went wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraplex.client import Client, render
from loraplex.server.core.shape import ModelShape
from loraplex.server.lora.format import CONFIG_FILE
from tests.integration.api.helpers import ADAPTERS, PROMPT, cli
from tests.support.adapters import write_adapter
from tests.support.server_process import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    return Client(server.target)


def test_generate_streams_the_text_and_summarises_on_stderr(server: ServerProcess, client: Client) -> None:
    expected = client.generate(PROMPT, adapter=ADAPTERS[3], max_new_tokens=8)
    done = cli(server, "generate", PROMPT, "--adapter", ADAPTERS[3], "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    assert f"adapter {ADAPTERS[3]} v1" in done.stderr and "8 generated tokens" in done.stderr


def test_json_output_is_the_typed_result(server: ServerProcess, client: Client) -> None:
    expected = client.generate(PROMPT, max_new_tokens=5, temperature=0.7, seed=3)
    done = cli(server, "generate", PROMPT, "--max-new-tokens", "5", "--temperature", "0.7", "--seed", "3", "--json")
    result = json.loads(done.stdout)
    assert result["text"] == expected.text and result["token_ids"] == list(expected.token_ids)
    assert result["served_by"]["adapter_id"] is None and set(result["timings"]) == {
        "queue_wait",
        "time_to_first_token",
        "engine",
        "total",
    }


def test_chat_reads_one_turn_per_line_and_keeps_the_history(server: ServerProcess) -> None:
    done = cli(server, "chat", "--system", "Be brief.", "--max-new-tokens", "12", stdin="Hi!\nWhat is 2+2?\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("finish:") == 2
    lines = [line for line in done.stdout.splitlines() if line]
    assert len(lines) >= 2 and "4" in done.stdout


def test_adapter_admin_tables_and_json(server: ServerProcess) -> None:
    loaded = cli(server, "adapters", "load", ADAPTERS[12], "--pin")
    assert loaded.returncode == 0 and "pinned           yes" in loaded.stdout
    table = cli(server, "adapters", "list").stdout.splitlines()
    assert table[0].split() == ["ADAPTER", "VERSION", "RANK", "TIER", "PINNED", "SIZE", "SERVED", "LOADED", "AT"]
    row = next(line.split() for line in table if line.startswith(ADAPTERS[12] + " "))
    assert row[1:5] == ["1", "8", row[3], "yes"] and row[3] in ("host", "device")
    listed = json.loads(cli(server, "--json", "adapters", "list").stdout)
    assert {"adapter_id": ADAPTERS[12], "pinned": True}.items() <= next(
        a for a in listed if a["adapter_id"] == ADAPTERS[12]
    ).items()
    shown = json.loads(cli(server, "adapters", "show", ADAPTERS[12], "--json").stdout)
    assert shown["target_modules"] == ["q_proj", "v_proj"]
    assert cli(server, "adapters", "load", ADAPTERS[12], "--unpin").returncode == 0
    assert cli(server, "adapters", "unload", ADAPTERS[12]).stdout.strip() == f"unloaded {ADAPTERS[12]}"
    assert cli(server, "adapters", "load", ADAPTERS[12]).returncode == 0  # back for the other tests


def test_adapters_list_shows_those_on_disk_and_notes_changed_files_and_a_cut(
    server: ServerProcess, client: Client, adapter_root: Path, base_shape: ModelShape
) -> None:
    directory = write_adapter(adapter_root / "cli" / "changed", base_shape, rank=4, seed=41)
    client.load_adapter("cli/changed")
    os.utime(directory / CONFIG_FILE, ns=(time.time_ns(), time.time_ns() + 10**9))
    done = cli(server, "adapters", "list")
    assert done.returncode == 0 and done.stderr == ""
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:-1]}
    assert rows["broken"] == ["broken", "-", "-", "disk", "no", "-", "-", "-"]  # on disk, never loaded
    assert rows["cli/changed"][1] == "1*" and done.stdout.splitlines()[-1] == render.CHANGED_NOTE
    total = client.list_adapters().total
    cut = cli(server, "adapters", "list", "--limit", "2")
    assert len([line for line in cut.stdout.splitlines()[1:] if line != render.CHANGED_NOTE]) == 2
    assert cut.stderr.startswith(f"showing 2 of {total} adapters (those in memory first)")
    scripted = cli(server, "--json", "adapters", "list", "--limit", "2")
    assert len(json.loads(scripted.stdout)) == 2 and scripted.stderr == cut.stderr
    refused = cli(server, "adapters", "list", "--limit", "0")
    assert refused.returncode == 2 and "'0' is not a whole number of at least 1" in refused.stderr


def test_status_health_and_tokenize(server: ServerProcess) -> None:
    health = cli(server, "health")
    assert health.returncode == 0
    assert [line.split()[-1] for line in health.stdout.splitlines()[1:]] == ["SERVING"] * 5
    assert json.loads(cli(server, "status", "--json").stdout)["accepting"] is True
    assert cli(server, "tokenize", "hello world").stdout.strip() == "2 tokens: [28120, 905]"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("generate", ""), "error: INVALID_ARGUMENT: send exactly one of"),
        (("adapters", "show", "nope"), "error: NOT_FOUND: adapter 'nope' is not loaded"),
        (("generate", PROMPT, "--route", "checkout"), "error: NOT_FOUND: unknown route 'checkout'"),
    ],
)
def test_errors_exit_1_with_the_code_and_message(server: ServerProcess, args: tuple[str, ...], says: str) -> None:
    done = cli(server, *args)
    assert done.returncode == 1 and says in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_server_is_unhealthy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loraplex.client.cli", "--target", "127.0.0.1:1", "--timeout", "2", "health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "error: UNAVAILABLE" in done.stderr
