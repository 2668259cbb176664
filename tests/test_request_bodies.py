"""The server's request bodies (serve/schema.py) over HTTP, on a stand-in model that never runs: every field of
the wrong JSON type is a 400 `invalid_type` naming the field in one line, a value out of range is the check
that reads it (`invalid_value`, `unsupported_parameter`, ...), null is the field left out, and fields the
server does not read are ignored."""

from __future__ import annotations

import pytest

from test_serve_store import TOKEN, stand_in_app

MESSAGES = 5  # not a list: a body that gets as far as the messages is refused there, before any model runs
REACHED_MESSAGES = (400, "invalid_type", "messages", "'messages' must be a non-empty list")

CHAT_CASES = [  # (body, (status, code, param, message))
    ({"n": True}, (400, "invalid_type", "n", "'n' must be int")),
    ({"n": 1.0}, (400, "invalid_type", "n", "'n' must be int")),
    ({"n": 2}, (400, "unsupported_parameter", "n", "only n=1 is supported")),
    ({"model": 5}, (400, "invalid_type", "model", "'model' must be str")),
    ({"model": "other"}, (404, "model_not_found", "model", None)),
    ({"erasers": "a"}, (400, "invalid_type", "erasers", "'erasers' must be a list of eraser names")),
    ({"erasers": ["a", 1]}, (400, "invalid_type", "erasers", "'erasers' must be a list of eraser names")),
    ({"erasers": ["nope"]}, (400, "unknown_eraser", "erasers", None)),
    ({"max_tokens": 1.5}, (400, "invalid_type", "max_tokens", "'max_tokens' must be int")),
    ({"max_tokens": "7"}, (400, "invalid_type", "max_tokens", "'max_tokens' must be int")),
    ({"max_tokens": 0}, (400, "invalid_value", "max_tokens", None)),
    ({"max_completion_tokens": 0, "max_tokens": 5}, (400, "invalid_value", "max_completion_tokens", None)),
    ({"temperature": "1"}, (400, "invalid_type", "temperature", "'temperature' must be int or float")),
    ({"temperature": True}, (400, "invalid_type", "temperature", "'temperature' must be int or float")),
    ({"temperature": 3}, (400, "invalid_value", "temperature", "'temperature' must be between 0 and 2")),
    ({"top_p": 0}, (400, "invalid_value", "top_p", "'top_p' must be in (0, 1]")),
    ({"seed": 1.0}, (400, "invalid_type", "seed", "'seed' must be int")),
    ({"stream": "yes"}, (400, "invalid_type", "stream", "'stream' must be bool")),
    ({"stream_options": []}, (400, "invalid_type", "stream_options", "'stream_options' must be dict")),
    ({"stop": ["x"]}, (400, "unsupported_parameter", "stop", None)),
    # valid types reach the messages: ints for floats, nulls for defaults, fields the server does not read
    ({"temperature": 1, "top_p": 1, "seed": 3, "stream": False, "stop": None}, REACHED_MESSAGES),
    ({"n": None, "max_tokens": None, "temperature": None, "erasers": None, "model": None}, REACHED_MESSAGES),
    ({"frequency_penalty": "anything", "user": 5, "logprobs": True}, REACHED_MESSAGES),
]


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    with TestClient(stand_in_app()) as test_client:
        yield test_client


def assert_refused(response, status: int, code: str, param: str, message: str | None) -> None:
    error = response.json()["error"]
    assert response.status_code == status and set(error) == {"message", "type", "param", "code"}, response.text
    assert (error["code"], error["param"]) == (code, param), response.text
    assert "\n" not in error["message"] and (message is None or error["message"] == message), response.text


@pytest.mark.parametrize("body, refusal", CHAT_CASES, ids=[str(body)[:60] for body, _ in CHAT_CASES])
def test_a_chat_body_of_the_wrong_type_is_one_line_naming_the_field(client, body, refusal):
    assert_refused(client.post("/v1/chat/completions", json={"messages": MESSAGES, **body}), *refusal)


def test_admin_bodies_are_typed_alike(client):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    cases = [("/admin/erasers", {"path": 5}, "path", "'path' must be str"),
             ("/admin/erasers", {"path": "x.safetensors", "name": ["a"]}, "name", "'name' must be str"),
             ("/admin/erasers", {"path": "x.safetensors", "tenants": "k1"}, "tenants", "'tenants' must be list"),
             ("/admin/bindings", {"tenant": 5}, "tenant", "'tenant' must be str"),
             ("/admin/bindings", {"tenant": "k", "bind": "a"}, "bind", "'bind' must be list"),
             ("/admin/bindings", {"tenant": "k", "unbind": {"a": 1}}, "unbind", "'unbind' must be list")]
    for path, body, param, message in cases:
        assert_refused(client.post(path, json=body, headers=admin), 400, "invalid_type", param, message)
    # null is the field left out: no path is the JSON branch's own refusal
    assert_refused(client.post("/admin/erasers", json={"path": None, "name": None}, headers=admin), 400,
                   "missing_path", "path", None)
