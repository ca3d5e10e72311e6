"""Errors a user can fix: one line that says what is wrong and what to do; the CLI exits non-zero.

`explain` is the one place that turns what the operating system, protobuf or a decoder says about the
user's data (a read-only or full disk, a name too long, a symlink loop, a damaged .onnx file, a modeling
file that is not UTF-8) into that line, so commands do not each wrap their I/O. A bug in our code still
shows its traceback.
"""

from __future__ import annotations

import errno

REASONS = {
    errno.EROFS: ("the file system is read-only", "choose an output on a writable disk"),
    errno.EACCES: ("permission denied", "check the permissions, or choose another path"),
    errno.EPERM: ("operation not permitted", "check the permissions, or choose another path"),
    errno.ENOSPC: ("no space left on the device", "free some space (or choose another disk) and rerun: finished "
                                                  "work is kept"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space and rerun: finished work is kept"),
    errno.ENAMETOOLONG: ("a file name is too long", "choose a shorter name"),
    errno.ELOOP: ("too many levels of symbolic links (a link loop)", "fix or remove the link"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.EISDIR: ("it is a directory", "give a file"),
    errno.EADDRINUSE: ("the address is already in use", "choose another --port or stop the other server"),
    errno.EADDRNOTAVAIL: ("the address is not on this machine", "bind to an address of this host (127.0.0.1)"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and rerun"),
}


class SurgeryError(Exception):
    """A user-fixable problem; its message is shown as is, without a traceback."""

    exit_code = 2


def explain(exc: BaseException) -> str | None:
    """One line for an error caused by the user's data or environment, or None for anything else."""
    if isinstance(exc, OSError) and exc.errno in REASONS:
        what, todo = REASONS[exc.errno]
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        return f"cannot use {where or 'a file'}: {what}; {todo}"
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 (source and config "
                "files must be UTF-8)")
    name = type(exc).__name__
    module = type(exc).__module__
    if name == "DecodeError" and module.startswith("google.protobuf"):
        return "a file is not a readable ONNX/protobuf file (truncated or damaged); re-run the stage that wrote it"
    if name == "ValidationError" and "onnx" in module:
        return f"an ONNX file is not valid ({str(exc).splitlines()[0][:200]}); re-run the stage that wrote it"
    return None
