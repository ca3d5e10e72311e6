"""`surgery tokenizer serve`: the model's tokenizer over HTTP for board runtimes (surgery/tokserver.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.common import Trust, app, out

tokenizer_app = typer.Typer(no_args_is_help=True, help="The model's tokenizer for board runtimes.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("serve")
def tokenizer_serve_cmd(
    directory: Annotated[Path, typer.Argument(help="Model, export or bundle directory with tokenizer files.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 12345,
    trust_remote_code: Trust = False,
    timeout: Annotated[float, typer.Option(help="Seconds a client gets to send a request's headers (and to stay "
                                                "idle between requests), and again its body.")] = 5.0,
) -> None:
    """Serve /encode (with the chat template), /decode, /bos_id, /eos_id over HTTP until SIGTERM or Ctrl-C.

    Example: surgery tokenizer serve ./Qwen2.5-0.5B-Instruct --host 127.0.0.1 --port 12345
    """
    from surgery.tokserver import make_server

    server = make_server(directory, host, port, trust_remote_code, timeout=timeout)
    bound, bound_port = server.server_address
    url_host = f"[{bound}]" if ":" in bound else bound
    out.print(f"serving the tokenizer of {directory} on http://{url_host}:{bound_port} "
              f"(vocabulary {server.app.vocab_size})", highlight=False, soft_wrap=True)
    server.serve_forever()
    out.print("stopped", highlight=False)
