"""One place for hashing and atomic writes, so every stage hands off complete files or none."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

STAGING_PREFIX = ".surgery-staging-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private files; give them the permissions a plain create would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so a 15 GB weight file costs no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        _chmod_default(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _tag(name: str) -> str:
    """A short stand-in for `name` in staging names: a 230-character name plus a prefix would pass 255."""
    return hashlib.sha256(name.encode()).hexdigest()[:12]


def remove_stale_staging(parent: Path, name: str) -> None:
    """Delete staging directories an interrupted run left beside `name`."""
    for stale in parent.glob(f"{STAGING_PREFIX}{_tag(name)}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield an empty sibling directory; on success it replaces `final` in two renames.

    An interruption before the swap leaves only a hidden staging directory (cleaned up by the next
    run), never a half-written `final`.
    """
    final = final.absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final.parent, final.name)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_tag(final.name)}-", dir=final.parent))
    _chmod_default(stage, directory=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f"{STAGING_PREFIX}{_tag(final.name)}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (no bytes copied; safe because every stage replaces files, never edits them
    in place), or copy when the filesystem cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """A copy of a directory tree made of hard links where possible (a 7B export is tens of GB)."""
    shutil.copytree(src, dst, copy_function=lambda s, d: link_or_copy(Path(s), Path(d)), dirs_exist_ok=True)


def read_text(path: Path) -> str:
    """A user's text file (config, modeling code) as UTF-8, or one line saying which file is not."""
    from surgery.errors import SurgeryError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SurgeryError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                           "and rerun") from None
