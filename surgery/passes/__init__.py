"""Graph passes: one small module per rewrite (a matcher plus a replacement), its test beside it.

Every module of this package is imported and registers its pass (`base.register`), so adding a pass is
adding a file; `PASSES` is what registered, `surgery passes` lists it, `pipelines.TARGETS` orders it per
compiler (a test checks every name there exists), `workarounds.WORKAROUNDS` says which pass avoids which
known compiler problem.
"""

import importlib
import pkgutil

from surgery.passes.base import PASSES, GraphPass, ModelPass, run_pass  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.endswith("_test") and _module.name != "testing":
        importlib.import_module(f"{__name__}.{_module.name}")
