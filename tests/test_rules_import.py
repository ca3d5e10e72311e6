"""Exact before/after for the import guards (patches/import_rules.py), and the snippets where each finds no anchor."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.import_rules import ImportOrNone, ImportWithFallback, OptionalImport


def test_optional_import_skips_imports_already_in_try():
    source = """
        import torch
        from pkg.main import A
        try:
            from pkg import B
        except ImportError:
            B = None
    """
    assert_rule(partial(OptionalImport, "pkg"), source, """
        import torch
        # surgery: test/rule: import made optional
        try:
            from pkg.main import A
        except ImportError as exc:
            raise ImportError('this feature needs `pip install pkg`') from exc
        try:
            from pkg import B
        except ImportError:
            B = None
    """)
    assert_rule(partial(OptionalImport, "other"), source, None)


FALLBACK = '''
def helper(mask):
    return mask
'''


def test_import_with_fallback():
    assert_rule(partial(ImportWithFallback, "transformers.gone", FALLBACK), """
        import torch
        from transformers.gone import helper
        from transformers.kept import other
    """, """
        import torch
        # surgery: test/rule: transformers.gone is gone in transformers 5
        try:
            from transformers.gone import helper
        except ImportError:
            def helper(mask):
                return mask
        from transformers.kept import other
    """)
    assert_rule(partial(ImportWithFallback, "transformers.gone", FALLBACK), """
        try:
            from transformers.gone import helper
        except ImportError:
            helper = None
    """, None)


def test_import_or_none():
    assert_rule(partial(ImportOrNone, "accelerate", "its 4-bit loader"), """
        import torch
        from accelerate import init_empty_weights

        logger = None
    """, """
        import torch
        # surgery: test/rule: accelerate is optional: only its 4-bit loader uses it
        try:
            from accelerate import init_empty_weights
        except ImportError:
            init_empty_weights = None

        logger = None
    """)
    # a submodule, a star import, or an import already guarded: not this rule's anchor
    for source in ("from accelerate.utils import x\n", "from accelerate import *\n",
                   "try:\n    from accelerate import x\nexcept ImportError:\n    x = None\n"):
        assert_rule(partial(ImportOrNone, "accelerate", "its 4-bit loader"), source, None)
