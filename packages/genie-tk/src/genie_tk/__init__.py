"""genie-tk: exact, fast AlphaFold2 triangle operations, a drop-in for OpenFold's layers.

Functional API: :func:`triangle_attention`, :func:`triangle_attention_layer`,
:func:`triangle_multiplicative_update`. Modules (OpenFold names, arguments and
``state_dict`` keys): ``TriangleMultiplicationOutgoing/Incoming``,
``FusedTriangleMultiplicationOutgoing/Incoming``, ``TriangleAttention``,
``TriangleAttentionStartingNode``, ``TriangleAttentionEndingNode``.
Backends (``tk``, ``triton``, ``torch``, ``reference``): :func:`backends` says what
runs here; ``GENIE_TK_BACKEND`` or ``backend=`` chooses.
"""

from genie_tk import reference
from genie_tk import tk_attention as _tk_attention  # noqa: F401  (registers the tk kernels)
from genie_tk import tk_trimul as _tk_trimul  # noqa: F401  (registers the tk kernels)
from genie_tk import triton as _triton  # noqa: F401  (registers the triton kernels)
from genie_tk._backend import BackendFallbackWarning, backends, last_backend
from genie_tk.modules import (
    FusedTriangleMultiplicationIncoming,
    FusedTriangleMultiplicationOutgoing,
    TriangleAttention,
    TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
    TriangleMultiplicationIncoming,
    TriangleMultiplicationOutgoing,
)
from genie_tk.ops import (
    triangle_attention,
    triangle_attention_layer,
    triangle_multiplicative_update,
)

__version__ = "0.1.0"

__all__ = [
    "BackendFallbackWarning",
    "FusedTriangleMultiplicationIncoming",
    "FusedTriangleMultiplicationOutgoing",
    "TriangleAttention",
    "TriangleAttentionEndingNode",
    "TriangleAttentionStartingNode",
    "TriangleMultiplicationIncoming",
    "TriangleMultiplicationOutgoing",
    "backends",
    "last_backend",
    "reference",
    "triangle_attention",
    "triangle_attention_layer",
    "triangle_multiplicative_update",
]
