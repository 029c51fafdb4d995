"""The client's chat turns: ChatMessages and OpenAI-style ``{"role", "content"}`` dicts become the same request, and
anything else is refused at the call with an error that names the turn and what to fix."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from loraplex.client import ChatMessage, Client
from loraplex.client.messages import chat_message, chat_messages, generate_request, tokenize_request


def test_dicts_and_chat_messages_make_the_same_requests() -> None:
    typed = [ChatMessage("system", "Be brief."), ChatMessage("user", "Name a planet.")]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."}]
    assert chat_messages(plain) == chat_messages(typed) == tuple(typed)
    assert chat_messages([plain[0], typed[1]]) == tuple(typed)  # mixed
    assert chat_messages(iter(plain)) == tuple(typed)
    assert chat_message(OrderedDict(role="user", content="")) == ChatMessage("user", "")
    assert generate_request(None, plain, {}) == generate_request(None, typed, {})
    assert tokenize_request(None, plain) == tokenize_request(None, typed)
    assert chat_messages(None) == () and chat_messages([]) == ()


@pytest.mark.parametrize(
    ("chat", "error", "says"),
    [
        ([{"role": "user"}], ValueError, "chat[0]: no 'content'; each chat message needs 'role' and 'content'"),
        ([{}], ValueError, "chat[0]: no 'content', 'role';"),
        (
            [ChatMessage("system", "x"), {"role": "user", "content": "hi", "name": "bob"}],
            ValueError,
            "chat[1]: unknown keys 'name'; a chat message has only 'role' and 'content'",
        ),
        ([{"role": "user", "content": 42}], TypeError, "chat[0]: 'content' is int, not str"),
        ([{"role": "user", "content": None}], TypeError, "chat[0]: 'content' is NoneType, not str"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            TypeError,
            "chat[0]: 'content' is list, not str",
        ),
        ([{"role": 1, "content": "hi"}], TypeError, "chat[0]: 'role' is int, not str"),
        ([ChatMessage("user", b"hi")], TypeError, "chat[0]: 'content' is bytes, not str"),  # type: ignore[arg-type]
        ([("user", "hi")], TypeError, "chat[0]: a tuple; pass a ChatMessage or a {'role': str, 'content': str} dict"),
        ({"role": "user", "content": "hi"}, TypeError, "chat: a single message; pass a list of them"),
        (ChatMessage("user", "hi"), TypeError, "chat: a single message; pass a list of them"),
        ("Name a planet.", TypeError, "chat: a str; pass a list of messages"),
        (7, TypeError, "chat: a int; pass a list of messages"),
    ],
)
def test_anything_else_is_refused_with_what_to_fix(chat: object, error: type[Exception], says: str) -> None:
    with pytest.raises(error) as raised:
        chat_messages(chat)
    assert str(raised.value).startswith(says)


def test_the_clients_refuse_a_bad_turn_before_calling_the_server() -> None:
    with Client("127.0.0.1:1", timeout=1) as client:  # nothing listens: a call would raise UnavailableError
        with pytest.raises(ValueError, match=r"chat\[0\]: no 'content'"):
            client.chat([{"role": "user"}])
        with pytest.raises(TypeError, match=r"chat\[0\]: 'content' is int"):
            client.chat_stream([{"role": "user", "content": 1}])  # type: ignore[dict-item]
        with pytest.raises(TypeError, match=r"chat\[0\]: a str"):
            client.tokenize(chat=["hi"])  # type: ignore[list-item]
