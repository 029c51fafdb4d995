"""Settings of the API layer: TLS files go together, a server reachable from other machines needs auth."""

from __future__ import annotations

import pytest

from loraplex.server.config import SettingsError, is_loopback, load_settings


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"server": {"host": "0.0.0.0"}}, "reachable from other machines but auth is off"),
        ({"server": {"tls_cert_file": "c.pem"}}, "tls_cert_file and server.tls_key_file go together"),
        ({"server": {"tls_client_ca_file": "ca.pem"}}, "tls_client_ca_file needs TLS"),
        (
            {"server": {"tls_cert_file": "c", "tls_key_file": "k", "tls_require_client_cert": True}},
            "needs server.tls_client_ca_file",
        ),
    ],
)
def test_inconsistent_settings_say_what_to_set(overrides: dict[str, dict[str, object]], says: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, overrides=overrides)
    assert says in str(raised.value)


def test_remote_hosts_are_fine_with_auth_or_an_explicit_opt_out() -> None:
    with_auth = load_settings(environ={}, overrides={"server": {"host": "0.0.0.0"}, "auth": {"tokens_file": "t.yaml"}})
    assert str(with_auth.auth.tokens_file) == "t.yaml"
    opted_out = load_settings(
        environ={"LORAPLEX_SERVER__HOST": "0.0.0.0", "LORAPLEX_AUTH__ALLOW_REMOTE_WITHOUT_AUTH": "true"}
    )
    assert opted_out.auth.allow_remote_without_auth and opted_out.server.host == "0.0.0.0"


def test_the_stream_write_timeout_is_a_positive_number_of_seconds() -> None:
    assert load_settings(environ={}).server.stream_write_timeout_s == 30.0
    from_env = load_settings(environ={"LORAPLEX_SERVER__STREAM_WRITE_TIMEOUT_S": "2.5"})
    assert from_env.server.stream_write_timeout_s == 2.5
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, overrides={"server": {"stream_write_timeout_s": 0}})
    assert "stream_write_timeout_s" in str(raised.value)
