"""The tokenizer server over real HTTP on loopback: the endpoints, bad requests that get a 4xx while the server
keeps serving, stalled connections closed by the timeout while others are served, the model's vocabulary for
/decode, one-line startup errors, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from surgery.errors import SurgeryError
from surgery.fixtures.tokenizer import write_tokenizer
from surgery.runtime import tokenizer_from
from surgery.tokserver import MAX_BODY, make_server, model_vocab_size

TIMEOUT = 1.0  # the server's stall timeout in these tests
VOCAB = 512  # the model's (config.json); the fixture tokenizer has 400 tokens + 3 specials


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return directory


@pytest.fixture(scope="module")
def server(tok_dir: Path):
    srv = make_server(tok_dir, "127.0.0.1", 0, timeout=TIMEOUT)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, tokenizer_from(tok_dir)
    srv.shutdown()
    thread.join(10)
    assert not thread.is_alive()


def call(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, payload


def post(srv, path: str, data: object):
    return call(srv, "POST", path, json.dumps(data).encode())


def raw(srv, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
    sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return got


def test_binds_loopback(server):
    assert server[0].server_address[0] == "127.0.0.1"


def test_encode_applies_the_chat_template_and_decode_round_trips(server):
    srv, tok = server
    status, chat = post(srv, "/encode", {"text": "hello fox"})
    assert status == 200
    want = tok.apply_chat_template([{"role": "user", "content": "hello fox"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert chat["token_ids"] == list(want)
    status, plain = post(srv, "/encode", {"text": "hello fox", "chat": False})
    assert plain["token_ids"] == tok("hello fox")["input_ids"] and len(plain["token_ids"]) < len(want)
    status, text = post(srv, "/decode", {"token_ids": plain["token_ids"]})
    assert status == 200 and text["text"] == "hello fox"
    assert call(srv, "GET", "/eos_id") == (200, {"eos_id": tok.eos_token_id})
    assert call(srv, "GET", "/bos_id") == (200, {"bos_id": tok.bos_token_id})


def test_system_prompt_and_special_tokens(server):
    srv, tok = server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert post(srv, "/encode", {"text": "hi", "system": "be brief"}) == (200, {"token_ids": list(want["input_ids"])})
    ids = list(want["input_ids"])
    assert post(srv, "/decode", {"token_ids": ids, "skip_special_tokens": False})[1]["text"] == tok.decode(ids)
    assert "<|im_start|>" not in post(srv, "/decode", {"token_ids": ids})[1]["text"]


def test_long_text_runs_off_the_event_loop(server):
    srv, tok = server
    text = "the quick brown fox " * 2000
    assert post(srv, "/encode", {"text": text, "chat": False}) == (200, {"token_ids": tok(text)["input_ids"]})


def test_decode_accepts_the_models_whole_vocabulary(server):
    srv, tok = server
    assert len(tok) < 450 < VOCAB
    ids = tok("hello fox")["input_ids"]
    assert post(srv, "/decode", {"token_ids": [450]}) == (200, {"text": ""})
    assert post(srv, "/decode", {"token_ids": [VOCAB - 1, *ids, 400, 450]}) == (200, {"text": "hello fox"})
    assert post(srv, "/decode", {"token_ids": [VOCAB]})[0] == 400
    assert post(srv, "/decode", {"token_ids": [-1]})[0] == 400


def test_vocab_size_from_manifest_then_config_then_tokenizer(tmp_path: Path):
    tokenizer = [0] * 403
    assert model_vocab_size(tmp_path, tokenizer) == 403
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 600}}))
    assert model_vocab_size(tmp_path, tokenizer) == 600
    (tmp_path / "manifest.json").write_text(json.dumps({"vocab_size": 512}))
    assert model_vocab_size(tmp_path, tokenizer) == 512


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/encode", b"{not json", 400),
    ("POST", "/encode", b"[1, 2]", 400),
    ("POST", "/encode", b'"text"', 400),
    ("POST", "/encode", b"", 400),
    ("POST", "/encode", b'{"text": "\\ud800"}', 400),  # a lone surrogate
    ("POST", "/encode", b'{"text": "hi", "system": "\\udfff"}', 400),
    ("POST", "/encode", b"[" * 200_000 + b"]" * 200_000, 400),  # nested 200,000 deep
    ("POST", "/encode", b'{"":' * 200_000 + b"1" + b"}" * 200_000, 400),  # objects 200,000 deep
    ("POST", "/encode", b'{"text": "\xff\xfe"}', 400),  # not UTF-8
    ("POST", "/encode", json.dumps({"text": 5}).encode(), 400),
    ("POST", "/encode", json.dumps({"text": "hi", "chat": "yes"}).encode(), 400),
    ("POST", "/encode", json.dumps({"text": "hi", "system": 5}).encode(), 400),
    ("POST", "/encode", json.dumps({"txt": "hi"}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [1, 10 ** 9]}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [10 ** 30]}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [-1]}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": "12"}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [1.5]}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [True]}).encode(), 400),
    ("POST", "/decode", json.dumps({"token_ids": [1], "skip_special_tokens": "no"}).encode(), 400),
    ("POST", "/nowhere", b"{}", 404),
    ("GET", "/", None, 404),
    ("GET", "/encode", None, 405),
    ("PUT", "/decode", b"{}", 405),
    ("POST", "/eos_id", b"{}", 405),
    ("POST", "/encode", b"x" * (MAX_BODY + 1), 413),
])
def test_bad_requests_get_4xx_and_the_server_keeps_running(server, method, path, body, status):
    srv, _ = server
    got, payload = call(srv, method, path, body)
    assert got == status and "error" in payload
    assert call(srv, "GET", "/eos_id")[0] == 200


def test_keep_alive_serves_many_requests_on_one_connection(server):
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    for _ in range(5):
        conn.request("POST", "/encode", body=json.dumps({"text": "fox"}))
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("connection") != "close"
        response.read()
    sock = conn.sock
    conn.request("GET", "/eos_id")
    conn.getresponse().read()
    assert conn.sock is sock  # the same socket throughout
    conn.close()


def test_negative_content_length_gets_400_and_close(server):
    srv, _ = server
    got = read_until_closed(raw(srv, b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}"))
    assert got.startswith(b"HTTP/1.1 400")


STALLS = {
    "nothing": b"",
    "partial headers": b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Le",
    "short body": b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10,
}


@pytest.mark.parametrize("kind", STALLS)
def test_a_stalled_connection_is_closed_by_the_timeout(server, kind):
    srv, _ = server
    start = time.monotonic()
    got = read_until_closed(raw(srv, STALLS[kind]))
    took = time.monotonic() - start
    assert TIMEOUT * 0.9 <= took <= TIMEOUT + 3
    assert got.startswith(b"HTTP/1.1 408") if kind == "short body" else got == b""


def test_header_trickle_cannot_outlive_the_timeout(server):
    srv, _ = server
    sock = raw(srv, b"G")
    start = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for byte in b"ET /eos_id HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            sock.send(bytes([byte]))
            time.sleep(0.1)
    assert time.monotonic() - start <= TIMEOUT + 3
    sock.close()


def test_a_body_trickle_cannot_outlive_the_timeout(server):
    srv, _ = server
    sock = raw(srv, b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    start = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):
            sock.send(b" ")
            time.sleep(0.1)
    assert time.monotonic() - start <= TIMEOUT + 3
    sock.close()


def test_oversized_headers_get_431_and_close(server):
    srv, _ = server
    got = read_until_closed(raw(srv, b"GET /eos_id HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * (200 << 10)))
    assert got.startswith(b"HTTP/1.1 431")
    assert call(srv, "GET", "/eos_id")[0] == 200


def test_fifty_stalled_sockets_are_closed_by_the_timeout_while_others_are_served(server):
    srv, _ = server
    socks = [raw(srv, list(STALLS.values())[i % 3]) for i in range(50)]
    opened = time.monotonic()
    for _ in range(20):
        start = time.monotonic()
        assert post(srv, "/encode", {"text": "hello fox"})[0] == 200
        assert time.monotonic() - start < 0.5
    closed = []
    for sock in socks:
        sock.settimeout(TIMEOUT + 5)
        read_until_closed(sock)
        closed.append(time.monotonic() - opened)
    assert len(closed) == 50 and TIMEOUT * 0.9 <= max(closed) <= TIMEOUT + 3
    assert call(srv, "GET", "/eos_id")[0] == 200


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from surgery.cli import main

    monkeypatch.setattr(sys, "argv", ["surgery", "tokenizer", "serve", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "out of range"),
    (["--port=-1"], "out of range"),
    (["--host", "203.0.113.9"], "cannot listen on 203.0.113.9"),  # TEST-NET-3: not an address of this machine
    (["--timeout", "0"], "--timeout"),
])
def test_startup_errors_are_one_line_and_exit_2(tok_dir, monkeypatch, capsys, args, message):
    code, err = _cli(monkeypatch, capsys, str(tok_dir), *args)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_port_in_use_is_one_line_and_exit_2(tok_dir, monkeypatch, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = _cli(monkeypatch, capsys, str(tok_dir), "--port", str(port))
        assert code == 2 and len(err.splitlines()) == 1 and os.strerror(errno.EADDRINUSE) in err, err


def test_directory_without_tokenizer_files_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, str(tmp_path), "--port", "0")
    assert code == 2 and len(err.splitlines()) == 1 and "cannot load the tokenizer" in err, err
    with pytest.raises(SurgeryError, match="is not a directory"):
        make_server(tmp_path / "nope", "127.0.0.1", 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_cli_stops_gracefully_on_a_signal(tok_dir, sig):
    proc = subprocess.Popen([sys.executable, "-c", "from surgery.cli import main; main()", "tokenizer", "serve",
                             str(tok_dir), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+) ", line)
        assert match, line + proc.stderr.read()
        port = int(match[1])
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        idle.request("GET", "/eos_id")
        assert idle.getresponse().read()  # an idle keep-alive connection stays open across the signal
        busy = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        busy.request("POST", "/encode", body=json.dumps({"text": "the quick brown fox " * 20_000, "chat": False}))
        time.sleep(0.1)  # the long text is being tokenized on the worker thread
        proc.send_signal(sig)
        start = time.monotonic()
        response = busy.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["token_ids"]) > 20_000  # answered
        assert proc.wait(10) == 0 and time.monotonic() - start < 5
        assert proc.stdout.read().strip() == "stopped"
        idle.close()
        busy.close()
    finally:
        proc.kill()
        proc.wait()
