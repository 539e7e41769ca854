"""The ``triton`` backend: Triton kernels for every NVIDIA GPU from Ampere on.

One module per op family (``triangle_attention``, ``triangle_multiplication``), each
holding its ``@triton.jit`` kernels, their host launchers on the current stream, the
``torch.library.custom_op`` registrations and the eligibility checks. Importing this
package registers them with the dispatcher when triton is installed; nothing is
registered otherwise (``genie_tk.backends()["triton"]`` then says why).

Under Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined,
i.e. when genie_tk is imported) the same kernel code runs on CPU tensors: that is how CI
proves this backend. ``verified`` flips to ``True`` per op only in the commit that
records the op passing its GPU tests; until then ``auto`` never picks it and
``backend="triton"`` runs it on request.
"""

from __future__ import annotations

import importlib

from genie_tk import _backend

# op -> (module, check function, run function, verified on a GPU)
_OPS = {
    "triangle_attention": ("triangle_attention", "check", "run", False),
    "triangle_attention_layer": ("triangle_attention", "check_layer", "run_layer", False),
    "triangle_multiplicative_update": ("triangle_multiplication", "check", "run", False),
}


def _register() -> None:
    for op, (module_name, check, run, verified) in _OPS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        _backend.register_triton(op, _backend.Kernel(getattr(module, check), getattr(module, run), verified))


if _backend.HAS_TRITON:
    _register()
