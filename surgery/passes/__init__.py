"""Graph passes: one small module per rewrite (a matcher plus a replacement), its test beside it.

`PASSES` is generated from the modules; `surgery passes` lists it, `pipelines.TARGETS` orders it per
compiler, `workarounds.WORKAROUNDS` says which pass avoids which known compiler problem.
"""

from surgery.passes import (  # noqa: F401  (importing registers each pass)
    cast_pairs,
    gqa_grouped,
    int32_inputs,
    mask_constant,
    opset17,
    rmsnorm,
    rope_tables,
    rotate_half,
    slim,
    transpose_pairs,
)
from surgery.passes.base import PASSES, GraphPass, ModelPass, run_pass  # noqa: F401
