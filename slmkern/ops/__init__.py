"""Every slmkern op: its torch.library schema, its input checks and its fake (meta) kernel, one file per op stem.

Backends register real kernels elsewhere (``_backends/cpu.py`` -> C++,
``_backends/triton.py`` -> Triton, ``_backends/__init__.py`` -> reference for any
other device). Each op's docstring first line states its shapes and dtypes; the
checks here enforce exactly those facts, raising TypeError/ValueError that name
the argument before any kernel runs.

Files: ``_lib.py`` (the library object, the check helpers, the autograd helpers), ``int8_linear.py``
(w8a8_linear, w8a16_linear), ``int4_linear.py`` (w4a16_linear, w4a8_linear), ``sparse_linear.py``,
``sparse24_linear.py`` (sparse24_linear, sparse24_w4a16_linear), ``attention.py``. This module
re-exports their public names (``slmkern.ops.check_int8_linear``, ``slmkern.ops.w8a8_linear``, ...).
"""
from __future__ import annotations

from slmkern.formats import sparse24 as sparse24_format  # noqa: F401 (backends validate through ops)
from slmkern.formats.common import FLOAT_DTYPES  # noqa: F401
from slmkern.ops._lib import LIB, _type, _value, as_rows, shape_only  # noqa: F401
from slmkern.ops.attention import attention, attention_ok, check_attention  # noqa: F401
from slmkern.ops.int4_linear import (INT4_MAX_K, check_int4_linear, check_int4_linear_fast,  # noqa: F401
                                     check_int4_zero_values, w4a8_linear, w4a16_linear)
from slmkern.ops.int8_linear import (ACTIVATIONS, EPILOGUES, check_activations, check_int8_linear,  # noqa: F401
                                     int8_linear_ok, w8a8_linear, w8a16_linear)
from slmkern.ops.sparse24_linear import (check_sparse24_linear, check_sparse24_w4a16_linear,  # noqa: F401
                                         sparse24_linear, sparse24_linear_ok, sparse24_w4a16_linear)
from slmkern.ops.sparse_linear import (check_sparse_linear, check_sparse_linear_data, sparse_linear,  # noqa: F401
                                       sparse_linear_ok)
