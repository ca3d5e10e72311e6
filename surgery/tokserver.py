"""`surgery tokenizer serve`: the model's own tokenizer over HTTP for board runtimes whose tokenizers get
special tokens wrong. JSON in, JSON out; bad requests get a 4xx and the server keeps serving.

    POST /encode  {"text": "...", "chat": true}   -> {"token_ids": [...]}   (chat: apply the chat template)
    POST /decode  {"token_ids": [...]}            -> {"text": "..."}
    GET  /bos_id, /eos_id                         -> {"bos_id": n} / {"eos_id": n}
"""

from __future__ import annotations

import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY = 1 << 20
DRAIN_LIMIT = 16 << 20  # an oversized body up to this is read and dropped so the client sees the 413


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def make_handler(tokenizer) -> type[BaseHTTPRequestHandler]:
    vocab = len(tokenizer)

    class Handler(BaseHTTPRequestHandler):
        server_version = "surgery-tokenizer/1"

        def log_message(self, format: str, *args: object) -> None:  # quiet by default
            pass

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header") from None
            if length > MAX_BODY:
                self.close_connection = True
                left = min(length, DRAIN_LIMIT)
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                    left -= len(chunk)
                raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
            try:
                data = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None
            if not isinstance(data, dict):
                raise BadRequest(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
            return data

        def do_GET(self) -> None:
            if self.path == "/bos_id":
                self._send(HTTPStatus.OK, {"bos_id": tokenizer.bos_token_id})
            elif self.path == "/eos_id":
                self._send(HTTPStatus.OK, {"eos_id": tokenizer.eos_token_id})
            elif self.path in ("/encode", "/decode"):
                self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"POST JSON to {self.path}"})
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": "endpoints: /encode /decode /bos_id /eos_id"})

        def do_POST(self) -> None:
            try:
                if self.path not in ("/encode", "/decode"):
                    raise BadRequest(HTTPStatus.NOT_FOUND, "endpoints: /encode /decode /bos_id /eos_id")
                data = self._body()
                self._send(HTTPStatus.OK, self._encode(data) if self.path == "/encode" else self._decode(data))
            except BadRequest as exc:
                self._send(exc.status, {"error": str(exc)})

        def _encode(self, data: dict) -> dict:
            text = data.get("text")
            if not isinstance(text, str):
                raise BadRequest(HTTPStatus.BAD_REQUEST, '"text" must be a string')
            if data.get("chat", True) and tokenizer.chat_template:
                messages = ([{"role": "system", "content": data["system"]}] if data.get("system") else [])
                messages.append({"role": "user", "content": text})
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
            else:
                ids = tokenizer(text)["input_ids"]
            return {"token_ids": list(ids)}

        def _decode(self, data: dict) -> dict:
            ids = data.get("token_ids")
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise BadRequest(HTTPStatus.BAD_REQUEST, '"token_ids" must be a list of integers')
            unknown = [i for i in ids if not 0 <= i < vocab]
            if unknown:
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"unknown token ids {unknown[:5]} (vocab {vocab})")
            return {"text": tokenizer.decode(ids, skip_special_tokens=bool(data.get("skip_special_tokens", True)))}

    return Handler


def make_server(directory: Path, host: str = "127.0.0.1", port: int = 12345,
                trust_remote_code: bool = False) -> ThreadingHTTPServer:
    from surgery.runtime import tokenizer_from

    return ThreadingHTTPServer((host, port), make_handler(tokenizer_from(directory, trust_remote_code)))
