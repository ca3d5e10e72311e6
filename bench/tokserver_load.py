"""Load and slowloris figures for `surgery tokenizer serve`, with the server in its own process (the CLI).

Builds the fixture tokenizer (400 tokens + specials) beside a config.json with vocab_size 512, starts
`surgery tokenizer serve --port 0`, and prints, without asserting anything:
  - keep-alive load: requests, concurrency, errors, p50/p99/max latency (mixed /encode chat and plain,
    /decode including ids past the tokenizer, /eos_id), each client on one persistent connection;
  - stalled connections: N sockets that send nothing, partial headers, or 10 of 100 declared body bytes;
    the latency of normal requests while they are open, how many the server closed and after how long;
  - the server's RSS after warm-up, after the load, and after the stall experiment;
  - how long SIGTERM takes to stop it and its exit code.

    .venv/bin/python bench/tokserver_load.py
    .venv/bin/python bench/tokserver_load.py --requests 5000 --concurrency 100 --stalled 300 --timeout 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from surgery.fixtures.tokenizer import write_tokenizer

BODIES = [
    ("POST", "/encode", {"text": "The quick brown fox jumps over the lazy dog."}),
    ("POST", "/encode", {"text": "Hello, how are you today?", "chat": False}),
    ("POST", "/encode", {"text": "What is a patch pack?", "system": "Answer briefly."}),
    ("POST", "/decode", {"token_ids": [87, 85, 286, 201, 260, 345, 310, 450, 511]}),
    ("GET", "/eos_id", None),
]
STALLS = [b"", b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Le",
          b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10]


def request_bytes(method: str, path: str, body: dict | None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n"
    return (head + ("Content-Type: application/json\r\n" if data else "") + "\r\n").encode() + data


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    await reader.readexactly(length)
    return status


async def load(port: int, requests: int, concurrency: int) -> tuple[list[float], int]:
    """`requests` requests over `concurrency` keep-alive connections; latencies (s) and the error count."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in counter:
            start = time.perf_counter()
            try:
                writer.write(request_bytes(*BODIES[i % len(BODIES)]))
                if await read_response(reader) != 200:
                    errors += 1
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latencies.append(time.perf_counter() - start)
        writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors


async def malformed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}")
    status_line = (await asyncio.wait_for(reader.read(), 30)).partition(b"\r\n")[0].decode()
    print(f"Content-Length: -1: {status_line!r}, then closed after "
          f"{(time.monotonic() - start) * 1000:.1f} ms")
    writer.close()


async def stalled(port: int, count: int, timeout: float) -> None:
    opened = time.monotonic()
    conns = []
    for i in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(STALLS[i % len(STALLS)])
        conns.append((reader, writer))
    print(f"stalled connections: {count} open ({count // 3} silent, {count // 3} partial headers, "
          f"{count - 2 * (count // 3)} 10 of 100 body bytes), timeout {timeout:g} s")
    during, errors = await load(port, 200, 10)
    report("  normal requests while they are open", during, errors, 10)

    async def until_closed(reader: asyncio.StreamReader) -> tuple[float, bytes]:
        try:
            data = await asyncio.wait_for(reader.read(), timeout + 10)
        except TimeoutError:
            return -1.0, b""
        except OSError:
            data = b""
        return time.monotonic() - opened, data

    results = await asyncio.gather(*(until_closed(reader) for reader, _ in conns))
    closed = sorted(t for t, _ in results if t >= 0)
    answered = sum(data.startswith(b"HTTP/1.1 408") for _, data in results)
    print(f"  closed by the server: {len(closed)}/{count} ({answered} after a 408 answer); after "
          f"min {closed[0]:.2f} s, median {statistics.median(closed):.2f} s, max {closed[-1]:.2f} s"
          if closed else f"  closed by the server: 0/{count}")
    for _, writer in conns:
        writer.close()


def report(title: str, latencies: list[float], errors: int, concurrency: int) -> None:
    ms = sorted(x * 1000 for x in latencies)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    print(f"{title}: requests {len(ms)}, concurrency {concurrency}, errors {errors}, "
          f"p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {ms[-1]:.2f} ms")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--stalled", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=3.0, help="the server's --timeout")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_tokenizer(directory)
        (directory / "config.json").write_text(json.dumps({"vocab_size": 512}))
        proc = subprocess.Popen([sys.executable, "-c", "from surgery.cli import main; main()", "tokenizer", "serve",
                                 str(directory), "--port", "0", "--timeout", str(args.timeout)],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            print(line.strip())
            port = int(re.search(r"http://127\.0\.0\.1:(\d+) ", line)[1])
            asyncio.run(load(port, 500, args.concurrency))  # warm-up
            before = rss_mib(proc.pid)
            latencies, errors = asyncio.run(load(port, args.requests, args.concurrency))
            report("keep-alive load", latencies, errors, args.concurrency)
            after = rss_mib(proc.pid)
            print(f"server RSS: {before:.1f} MiB after warm-up, {after:.1f} MiB after the load "
                  f"({(after / before - 1) * 100:+.1f}%)")
            asyncio.run(malformed(port))
            asyncio.run(stalled(port, args.stalled, args.timeout))
            latencies, errors = asyncio.run(load(port, args.requests, args.concurrency))
            report("keep-alive load again", latencies, errors, args.concurrency)
            print(f"server RSS after the stall experiment and a second load: {rss_mib(proc.pid):.1f} MiB "
                  f"({(rss_mib(proc.pid) / before - 1) * 100:+.1f}% on warm-up)")
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            print(f"SIGTERM: exited with {code} after {time.monotonic() - start:.2f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
