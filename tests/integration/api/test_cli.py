"""The ``loraplex`` CLI as a user runs it: streaming generation and chat, JSON for scripts, adapter admin, status,
health, and errors that say what went wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraplex.client import Client
from tests.integration.api.helpers import ADAPTERS, PROMPT, cli
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
