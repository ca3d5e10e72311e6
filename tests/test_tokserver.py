"""The tokenizer server over real HTTP on loopback: the endpoints, and bad requests that get a 4xx while
the server keeps serving."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path

import pytest

from surgery.fixtures.tokenizer import write_tokenizer
from surgery.runtime import tokenizer_from
from surgery.tokserver import MAX_BODY, make_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    srv = make_server(directory, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, tokenizer_from(directory)
    srv.shutdown()
    srv.server_close()


def call(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, payload


def test_binds_loopback(server):
    assert server[0].server_address[0] == "127.0.0.1"


def test_encode_applies_the_chat_template_and_decode_round_trips(server):
    srv, tok = server
    status, chat = call(srv, "POST", "/encode", json.dumps({"text": "hello fox"}).encode())
    assert status == 200
    want = tok.apply_chat_template([{"role": "user", "content": "hello fox"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert chat["token_ids"] == list(want)
    status, plain = call(srv, "POST", "/encode", json.dumps({"text": "hello fox", "chat": False}).encode())
    assert plain["token_ids"] == tok("hello fox")["input_ids"] and len(plain["token_ids"]) < len(want)
    status, text = call(srv, "POST", "/decode", json.dumps({"token_ids": plain["token_ids"]}).encode())
    assert status == 200 and text["text"] == "hello fox"
    assert call(srv, "GET", "/eos_id") == (200, {"eos_id": tok.eos_token_id})
    assert call(srv, "GET", "/bos_id") == (200, {"bos_id": tok.bos_token_id})


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/encode", b"{not json", 400),
    ("POST", "/encode", b"[1, 2]", 400),
    ("POST", "/encode", json.dumps({"text": 5}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [1, 10 ** 9]}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [-1]}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": "12"}).encode(), 400),
    ("POST", "/nowhere", b"{}", 404),
    ("GET", "/encode", None, 405),
    ("POST", "/encode", b"x" * (MAX_BODY + 1), 413),
])
def test_bad_requests_get_4xx_and_the_server_keeps_running(server, method, path, body, status):
    srv, _ = server
    got, payload = call(srv, method, path, body)
    assert got == status and "error" in payload
    assert call(srv, "GET", "/eos_id")[0] == 200


def test_missing_directory_is_one_line(tmp_path: Path):
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="is not a directory"):
        make_server(tmp_path / "nope", "127.0.0.1", 0)
