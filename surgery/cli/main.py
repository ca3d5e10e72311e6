"""The console entry point: every command group registered on one app; user-fixable errors (and the OS's
complaints about the user's data, surgery/errors.py) become one line and exit code 2."""

from __future__ import annotations

from surgery.cli import device_cmds, graph_cmds, packs_cmds, serve_cmds  # noqa: F401  (registers the commands)
from surgery.cli.common import app, err
from surgery.errors import SurgeryError, explain


def main() -> None:
    try:
        app()
    except SurgeryError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: finished work is kept; rerun the same command to resume", highlight=False)
        raise SystemExit(130) from None
    except Exception as exc:  # the user's data or environment (disk, names, damaged files); a bug re-raises
        message = explain(exc)
        if message is None:
            raise
        err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
