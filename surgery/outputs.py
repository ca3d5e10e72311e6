"""Where a command may write: one rule for every command that writes a directory.

People point this tool at a 15 GB checkpoint they downloaded overnight; losing it is not an option. So a
command writes only into a directory that is new, empty, or one surgery wrote (its record `.surgery.json`
is there), never into, over or around its input, and never over files surgery did not write. The record
lists what the command wrote (a name ending in `/` covers a whole subdirectory), registered before the file
is created, so a killed run resumes and a rerun can tell our files from a user's. `--force` replaces a
directory surgery wrote for another command or input; nothing replaces a directory surgery did not write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.fsutil import STAGING_PREFIX, atomic_write_json

OWNED = ".surgery.json"


def _is_scratch(name: str) -> bool:
    """Our own staging and temp names, which a killed run may leave behind."""
    return name == OWNED or name.startswith((STAGING_PREFIX, ".surgery-")) or (
        name.startswith(".") and name.endswith(".tmp"))


def _related(out: Path, source: Path) -> str | None:
    """How `out` would touch `source`: it is the source, lies inside it, or contains it."""
    out, source = out.resolve(), source.resolve()
    if out == source:
        return "is"
    if source in out.parents:
        return "lies inside"
    if out in source.parents:
        return "contains"
    return None


class Output:
    """A claimed output directory; `add` registers names before they are written."""

    def __init__(self, path: Path, command: str, inputs: dict[str, str], files: set[str]) -> None:
        self.path, self.command, self.inputs, self.files = path, command, inputs, files

    def add(self, *names: str) -> None:
        if set(names) - self.files:
            self.files |= set(names)
            self.save()

    def save(self) -> None:
        atomic_write_json(self.path / OWNED, {"tool": "surgery", "command": self.command, "inputs": self.inputs,
                                              "files": sorted(self.files)})


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads((path / OWNED).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("files"), list)
    return record if ok and all(isinstance(f, str) for f in record["files"]) else None


def foreign_files(path: Path, listed: list[str]) -> list[str]:
    """Files under `path` that the record does not cover (and are not our scratch names)."""
    names, prefixes = set(listed), tuple(f for f in listed if f.endswith("/"))
    found = []
    for entry in sorted(path.rglob("*")):
        rel = entry.relative_to(path).as_posix()
        if entry.is_dir() and not entry.is_symlink():
            continue
        if rel in names or rel.startswith(prefixes) or _is_scratch(entry.name):
            continue
        if any(part.startswith(STAGING_PREFIX) for part in Path(rel).parts[:-1]):
            continue
        found.append(rel)
    return found


def write_record(path: Path, command: str, inputs: dict[str, Path]) -> None:
    """Record every file now under `path` as written by `command` (for a directory built in one go)."""
    files = {e.relative_to(path).as_posix() for e in path.rglob("*")
             if (e.is_file() or e.is_symlink()) and not _is_scratch(e.name)}
    Output(path, command, {k: str(Path(v).resolve()) for k, v in inputs.items()}, files).save()


def claim(path: Path, command: str, inputs: dict[str, Path], force: bool = False, create: bool = True) -> Output:
    """Check that `command` may write `path`, and (`create`) create it and register the claim; commands that
    build a directory elsewhere and swap it in only check.

    A directory surgery wrote for the same command and inputs is resumed (its files stay registered); one it
    wrote for something else needs `force` and starts over. Raises a one-line SurgeryError otherwise."""
    path = Path(path)
    for role, source in inputs.items():
        how = _related(path, Path(source))
        if how:
            raise SurgeryError(f"the output {path} {how} the {role} {source}; choose an output outside it")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SurgeryError(f"{path} exists and is not a directory; choose another output")
    stated = {role: str(Path(source).resolve()) for role, source in inputs.items()}
    if not path.exists() or not any(path.iterdir()):
        out = Output(path, command, stated, set())
        if create:
            path.mkdir(parents=True, exist_ok=True)
            out.save()
        return out
    record = read_record(path)
    if record is None:
        raise SurgeryError(f"{path} is not empty and was not written by surgery; choose a new or empty directory "
                           "(surgery never replaces files it did not write, --force included)")
    foreign = foreign_files(path, record["files"])
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise SurgeryError(f"{path} holds files surgery did not write ({foreign[0]}{more}); move them or choose "
                           "another output")
    same = record.get("command") == command and record.get("inputs") == stated
    if not same and not force:
        raise SurgeryError(f"{path} was written by `surgery {record.get('command')}` from other inputs; pass --force "
                           "to replace it, or choose another output")
    out = Output(path, command, stated, set(record["files"]) if same else set())
    if create:
        if not same:  # --force: start over, removing only what the record says surgery wrote
            _remove(path, record["files"])
        out.save()
    return out


def _remove(path: Path, listed: list[str]) -> None:
    root = path.resolve()
    for name in listed:
        target = (path / name.rstrip("/"))
        if root not in target.resolve().parents and not target.is_symlink():
            continue  # a record naming something outside the directory is never followed
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def adopt(path: Path, commands: tuple[str, ...], what: str) -> Output:
    """A directory a command changes in place (`optimize` on an export): it must be one surgery wrote, by one
    of `commands`, with nothing foreign in it. New files are registered on the returned Output."""
    record = read_record(path)
    if record is None or record.get("command") not in commands:
        raise SurgeryError(f"{path} was not written by `surgery {commands[0]}`; {what} only changes directories "
                           "surgery wrote")
    foreign = foreign_files(path, record["files"])
    if foreign:
        raise SurgeryError(f"{path} holds files surgery did not write ({foreign[0]}); move them first")
    return Output(path, record["command"], record.get("inputs", {}), set(record["files"]))
