"""Import guards (a rule library: it defines no pack): put a remote-code import into try/except ImportError.

transformers refuses to load remote code whose imports are missing unless they sit in a try block, and 2023
remote code imports packages export never uses (a streaming generator, accelerate for a 4-bit loader) or
helper modules transformers 5 removed. One base finds an import outside any try; each rule says which imports
it takes and what its except clause does: re-raise naming the package, define a fallback, or bind None.
"""

from __future__ import annotations

import libcst as cst

from surgery.codemod import Rule


def wrap_in_try(stmt: cst.SimpleStatementLine, handler: str) -> cst.BaseStatement:
    """`try: <stmt>` followed by `handler` (an except clause's source); the statement's leading comments and
    blank lines stay above the `try`."""
    wrapped = cst.parse_statement(f"try:\n    pass\n{handler}")
    return wrapped.with_changes(body=wrapped.body.with_changes(body=[stmt.with_changes(leading_lines=[])]),
                                leading_lines=stmt.leading_lines)


class _ImportOutsideTry(Rule):
    """Base of the import guards: a `from <module> import ...` statement outside any try block that `takes`
    accepts goes into `try:` with the except clause `handler` writes. An import already in a try block is
    left alone (it is guarded, and a rerun must not wrap it twice)."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module
        self._try_depth = 0

    def visit_Try(self, node: cst.Try) -> None:
        self._try_depth += 1

    def leave_Try(self, original: cst.Try, updated: cst.Try) -> cst.Try:
        self._try_depth -= 1
        return updated

    def takes(self, node: cst.ImportFrom, module: str) -> bool:
        """Whether this rule guards `node`, an import from the dotted `module`."""
        raise NotImplementedError

    def handler(self, node: cst.ImportFrom) -> tuple[str, str]:
        """The except clause's source and the marker's note."""
        raise NotImplementedError

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.BaseStatement:
        if self._try_depth:
            return updated
        found = next((s for s in updated.body if isinstance(s, cst.ImportFrom) and s.module is not None
                      and self.takes(s, cst.Module([]).code_for_node(s.module))), None)
        if found is None:
            return updated
        clause, note = self.handler(found)
        return self.mark(wrap_in_try(updated, clause), note)


class OptionalImport(_ImportOutsideTry):
    """`from <module>... import ...` in try/except ImportError that re-raises naming the package: the feature
    that needs it then fails only when it is used."""

    def __init__(self, module: str) -> None:
        super().__init__(module)
        self.name = "wrap-import"
        self.anchor = f"`from {module}... import ...` outside a try block"

    def takes(self, node: cst.ImportFrom, module: str) -> bool:
        return module.split(".")[0] == self.module

    def handler(self, node: cst.ImportFrom) -> tuple[str, str]:
        return (f"except ImportError as exc:\n    raise ImportError('this feature needs `pip install {self.module}`')"
                " from exc\n", "import made optional")


class ImportWithFallback(_ImportOutsideTry):
    """`from <module> import ...` -> `try: <that import> except ImportError: <fallback>`: a helper module the
    remote code was written against and transformers 5 removed, replaced by the same functions defined here."""

    name = "import-with-fallback"

    def __init__(self, module: str, fallback: str, note: str | None = None) -> None:
        super().__init__(module)
        self.fallback = fallback
        self.note = note or f"{module} is gone in transformers 5"  # why the marker says the import is guarded
        self.anchor = f"`from {module} import ...` outside a try block"

    def takes(self, node: cst.ImportFrom, module: str) -> bool:
        return module == self.module

    def handler(self, node: cst.ImportFrom) -> tuple[str, str]:
        indented = "".join(f"    {line}\n" if line else "\n" for line in self.fallback.strip("\n").splitlines())
        return f"except ImportError:\n{indented}", self.note


class ImportOrNone(_ImportOutsideTry):
    """`from <module> import a, b` -> `try: <it> except ImportError: a = b = None`: the names exist either
    way, and only the code path that uses them (`user`, e.g. a 4-bit loader export never runs) would fail.
    Only the package itself (`from <module> import`, not a submodule) and only named imports, not `*`."""

    name = "import-or-none"

    def __init__(self, module: str, user: str) -> None:
        super().__init__(module)
        self.user = user
        self.anchor = f"a `from {module} import ...` outside a try block"

    def takes(self, node: cst.ImportFrom, module: str) -> bool:
        return module == self.module and not isinstance(node.names, cst.ImportStar)

    def handler(self, node: cst.ImportFrom) -> tuple[str, str]:
        names = " = ".join(a.evaluated_alias or a.evaluated_name for a in node.names)
        return f"except ImportError:\n    {names} = None\n", f"{self.module} is optional: only {self.user} uses it"
