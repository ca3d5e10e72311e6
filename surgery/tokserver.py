"""`surgery tokenizer serve`: the model's own tokenizer over HTTP for board runtimes whose tokenizers get
special tokens wrong. JSON in, JSON out; bad requests get a 4xx with {"error": ...} and the server keeps serving.

    POST /encode  {"text": "...", "chat": true, "system": "..."}       -> {"token_ids": [...]}
    POST /decode  {"token_ids": [...], "skip_special_tokens": true}   -> {"text": "..."}
    GET  /bos_id, /eos_id                                            -> {"bos_id": n} / {"eos_id": n}

/decode accepts every id below the MODEL's vocabulary size (`vocab_size` in manifest.json or config.json of the
served directory, else the tokenizer's length), since embedding tables are often padded past the tokenizer; ids
the tokenizer has no token for decode to "" (dropped from the text). Ids < 0 or >= the vocabulary size are 400.

Why uvicorn + httptools plus a request-head deadline: a server left running for weeks on a small board needs a
cheap request path (~200 us of CPU a request here; Hypercorn's pure-Python stack ~600 us, p99 over 50 ms at 50
clients) and must drop every stalled client. uvicorn 0.54 never times out a request head (its only timer,
`timeout_keep_alive`, is armed after a response and cancelled by any byte in `data_received`), so a client that
sends nothing or partial headers holds a connection forever; nor does httptools cap header size. `_HeadDeadline`
closes a connection whose head is not complete within `timeout` s of opening (or of the last response) or passes
MAX_HEAD bytes; the app answers 408 and closes when the body is not whole within `timeout` s. Malformed HTTP
(`Content-Length: -1`) gets uvicorn's plain-text 400 and a close. We bind the socket: bind errors are one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from surgery.errors import SurgeryError
from surgery.runtime import encode_prompt

MAX_BODY = 1 << 20
DRAIN_LIMIT = 16 << 20  # an oversized body up to this is read and dropped so the client sees the 413
INLINE_LIMIT = 4096  # texts and id lists up to this run on the event loop; longer ones on the worker thread
MAX_HEAD = 64 << 10  # request line and headers
TIMEOUT = 5.0
BACKLOG = 2048
ENDPOINTS = {"/encode": "POST", "/decode": "POST", "/bos_id": "GET", "/eos_id": "GET"}

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def model_vocab_size(directory: Path, tokenizer: Any) -> int:
    """The model's vocabulary size: manifest.json's or config.json's `vocab_size`, else the tokenizer's length."""
    for name in ("manifest.json", "config.json"):
        try:
            data = json.loads((directory / name).read_text())
            size = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return len(tokenizer)


def _string(data: Message, key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise BadRequest(400, f'"{key}" must be a string')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(400, f'"{key}" is not valid Unicode (a lone surrogate such as \\ud800)') from None
    return value


def _flag(data: Message, key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(400, f'"{key}" must be true or false')
    return value


class TokenizerApp:
    """The ASGI app: routing, a bounded body read, validation, then the tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, timeout: float = TIMEOUT) -> None:
        self.tokenizer, self.vocab_size, self.timeout = tokenizer, vocab_size, timeout
        self.decodable = len(tokenizer)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")  # long inputs, one at a time

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan="off"
            return
        status = 200
        try:
            payload = await self._route(scope, receive)
        except BadRequest as exc:
            status, payload = exc.status, {"error": str(exc)}
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status in (408, 413):  # the rest of the body is not read
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Message, receive: Receive) -> Message:
        path, method = scope["path"], scope["method"]
        if path not in ENDPOINTS:
            raise BadRequest(404, "endpoints: POST /encode /decode, GET /bos_id /eos_id")
        if method != ENDPOINTS[path]:
            raise BadRequest(405, f"use {ENDPOINTS[path]} for {path}")
        if method == "GET":  # /bos_id, /eos_id
            return {path[1:]: getattr(self.tokenizer, path[1:].replace("_id", "_token_id"))}
        data = await self._json(scope, receive)
        size, job = self._encode(data) if path == "/encode" else self._decode(data)
        try:
            if size <= INLINE_LIMIT:
                return job()
            return await asyncio.get_running_loop().run_in_executor(self.worker, job)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
            raise BadRequest(400, f"the tokenizer rejected the input ({type(exc).__name__}: {exc})") from None

    async def _json(self, scope: Message, receive: Receive) -> Message:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
            raise BadRequest(413, f"body over {MAX_BODY} bytes")
        chunks, size, more = list[bytes](), 0, True
        try:
            async with asyncio.timeout(self.timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":  # uvicorn drops what we send then
                        raise BadRequest(400, "the client went away")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size <= MAX_BODY:
                        chunks.append(chunk)
                    more = message.get("more_body", False) and size <= DRAIN_LIMIT
        except TimeoutError:
            raise BadRequest(408, f"the body did not arrive within {self.timeout:g} s") from None
        if size > MAX_BODY:
            raise BadRequest(413, f"body over {MAX_BODY} bytes")
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            raise BadRequest(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadRequest(400, "body must be a JSON object")
        return data

    def _encode(self, data: Message) -> tuple[int, Callable[[], Message]]:
        if "text" not in data:
            raise BadRequest(400, 'send {"text": "..."}')
        text, tok = _string(data, "text"), self.tokenizer
        system = _string(data, "system") if data.get("system") is not None else None
        chat = _flag(data, "chat", True)
        return len(text), lambda: {"token_ids": encode_prompt(tok, text, chat, system)}

    def _decode(self, data: Message) -> tuple[int, Callable[[], Message]]:
        ids = data.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequest(400, '"token_ids" must be a list of integers')
        unknown = [i for i in ids if not 0 <= i < self.vocab_size]
        if unknown:
            raise BadRequest(400, f"token ids {unknown[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        skip = _flag(data, "skip_special_tokens", True)
        known = [i for i in ids if i < self.decodable]  # ids past the tokenizer (padded embeddings) decode to ""
        return len(ids), lambda: {"text": self.tokenizer.decode(known, skip_special_tokens=skip)}

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


def listen(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening socket, or a one-line SurgeryError (port out of range or in use, host not bindable)."""
    if not 0 <= port <= 65535:
        raise SurgeryError(f"port {port} is out of range; use 1-65535 (0 picks a free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        raise SurgeryError(f"cannot resolve host {host!r} ({exc.strerror or exc}); pass e.g. 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = ("another process listens there; stop it or pick another --port" if exc.errno == errno.EADDRINUSE
                else "pass an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")
        raise SurgeryError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); {hint}") from None
    return sock


class _HeadDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request head is late or over MAX_HEAD bytes."""

    head_timer: asyncio.TimerHandle | None = None
    head_bytes = 0

    def _await_head(self, wait: bool = True) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_bytes, close = 0, self.timeout_keep_alive_handler  # closes unless already closing
        self.head_timer = self.loop.call_later(self.timeout_keep_alive, close) if wait else None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_timer is not None and not self.transport.is_closing():  # the head is still incomplete
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n"
                                     b"content-length: 0\r\n\r\n")
                self.transport.close()

    def on_headers_complete(self) -> None:
        self._await_head(wait=False)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # uvicorn now waits for the next request
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._await_head(wait=False)
        super().connection_lost(exc)


class TokenizerServer:
    """uvicorn serving a TokenizerApp on a socket bound at construction. `serve_forever()` blocks until
    `shutdown()` (from another thread) or, in the main thread, SIGTERM/SIGINT; both answer in-flight requests.
    Never served? Close `sock` yourself."""

    def __init__(self, app: TokenizerApp, sock: socket.socket, timeout: float = TIMEOUT,
                 backlog: int = BACKLOG) -> None:
        self.app, self.sock, self.server_address = app, sock, sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(
            app, http=_HeadDeadline, ws="none", loop="asyncio", lifespan="off", backlog=backlog,
            timeout_keep_alive=timeout, timeout_graceful_shutdown=timeout,  # type: ignore[arg-type]
            log_config=None, log_level="warning", access_log=False, server_header=False))
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # ours: exit 0, no re-raise
        self._serving, self._stopped = threading.Event(), threading.Event()

    def serve_forever(self) -> None:
        self._serving.set()
        try:
            asyncio.run(self._serve())
        finally:
            self.app.close()
            self._stopped.set()

    async def _serve(self) -> None:
        gc.collect()
        gc.freeze()  # the tokenizer's and transformers' objects: full collections skip them (no 150 ms pauses)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, setattr, self.server, "should_exit", True)
        await self.server.serve(sockets=[self.sock])

    def shutdown(self) -> None:
        """From another thread: stop, and wait until in-flight requests are answered."""
        self.server.should_exit = True  # uvicorn's main loop looks every 0.1 s
        if self._serving.is_set():
            self._stopped.wait()


def make_server(directory: Path, host: str = "127.0.0.1", port: int = 12345, trust_remote_code: bool = False,
                timeout: float = TIMEOUT, backlog: int = BACKLOG) -> TokenizerServer:
    """Bind, load the tokenizer, and return the server (call `serve_forever()`); errors are SurgeryError."""
    from surgery.runtime import tokenizer_from

    if not timeout > 0:
        raise SurgeryError(f"--timeout {timeout} must be a positive number of seconds")
    sock = listen(host, port, backlog)
    try:
        tokenizer = tokenizer_from(directory, trust_remote_code)
    except BaseException:
        sock.close()
        raise
    app = TokenizerApp(tokenizer, model_vocab_size(Path(directory), tokenizer), timeout)
    return TokenizerServer(app, sock, timeout, backlog)
