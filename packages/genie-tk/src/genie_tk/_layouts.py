"""What the other projects' layouts (:mod:`genie_tk.openfold3`, :mod:`genie_tk.boltz`) share.

* :class:`GatedAttention`: the ``mha.*`` parameters of a triangle attention layer
  whose linears may have no biases;
* :func:`stacked`: two linears as one stacked projection;
* :func:`patch` and :func:`replace_modules`: swap another project's layer classes
  for genie-tk's before a model is built, or its layer modules for genie-tk's in a
  built model, keeping the parameters.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from genie_tk.modules import Linear

# Where another project defines a class (module, class name) -> the genie-tk class.
ClassTable = Mapping[tuple[str, str], type]


def linear(in_dim: int, out_dim: int, bias: bool, init: str) -> Linear:
    """A linear with OpenFold's initialisers (``he_normal`` is OpenFold3's name for ``relu``)."""
    return Linear(in_dim, out_dim, bias=bias, init="relu" if init == "he_normal" else init)


class GatedAttention(nn.Module):
    """The parameters of OpenFold3's / Boltz's gated ``Attention`` (``mha.*`` keys).

    ``specs`` maps ``linear_q``, ``linear_k``, ``linear_v``, ``linear_o`` and
    ``linear_g`` to ``(bias, init)``. Only its weights are used: the layer runs
    through :func:`genie_tk.triangle_attention_layer`, which has no q/k/v biases.
    """

    def __init__(self, c_q: int, c_hidden: int, no_heads: int, specs: Mapping[str, tuple[bool, str]]):
        super().__init__()
        for name in ("linear_q", "linear_k", "linear_v"):
            if specs[name][0]:
                raise ValueError(f"{name} with a bias is not supported: genie-tk's triangle attention "
                                 "projects q, k and v without biases")
        self.c_q = self.c_k = self.c_v = c_q
        self.c_hidden, self.no_heads, self.gating = c_hidden, no_heads, True
        width = c_hidden * no_heads
        self.linear_q = linear(c_q, width, *specs["linear_q"])
        self.linear_k = linear(c_q, width, *specs["linear_k"])
        self.linear_v = linear(c_q, width, *specs["linear_v"])
        self.linear_o = linear(width, c_q, *specs["linear_o"])
        self.linear_g = linear(c_q, width, *specs["linear_g"])


def stacked(first: nn.Linear, second: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of the two linears as one ``[2·Ch, C]`` projection (a rows, then b)."""
    weight = torch.cat([first.weight, second.weight])
    if first.bias is None and second.bias is None:
        return weight, None
    biases = [lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in (first, second)]
    return weight, torch.cat(biases)


def _originals(project: str, table: ClassTable) -> dict[int, tuple[type, type]]:
    """``{id(original class): (original, replacement)}``, importing ``project``'s layer modules."""
    found = {}
    for (module, name), replacement in table.items():
        try:
            original = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise ImportError(f"genie_tk: cannot patch {project}: importing {module} failed ({exc})") from exc
        found[id(original)] = (original, replacement)
    return found


def _swap_names(prefix: str, swap: Mapping[int, type]) -> None:
    """Rebind every name in the loaded ``prefix*`` modules that holds a class in ``swap``."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == prefix or name.startswith(prefix + ".")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and id(value) in swap:
                setattr(module, attr, swap[id(value)])


@contextlib.contextmanager
def patch(project: str, table: ClassTable) -> Iterator[None]:
    """Inside the block, every module of package ``project`` that is loaded (or
    loads) sees the genie-tk classes of ``table`` under the original names, so
    models built there use genie-tk layers; on exit the original classes return."""
    pairs = _originals(project, table)
    _swap_names(project, {key: new for key, (_, new) in pairs.items()})
    try:
        yield
    finally:
        _swap_names(project, {id(new): old for old, new in pairs.values()})


def replace_modules(model: nn.Module, table: ClassTable, build: Callable[[type, nn.Module], nn.Module]) -> nn.Module:
    """Replace, in place, every submodule of ``model`` whose class is in ``table``.

    ``build(cls, old)`` makes the genie-tk module (on the meta device: no
    memory); it then takes over ``old``'s very parameter objects (so an optimizer
    built on the model keeps working) after a strict ``state_dict`` check.
    Returns ``model`` (itself replaced when it is such a layer).
    """
    def convert(old: nn.Module) -> nn.Module | None:
        cls = table.get((type(old).__module__, type(old).__qualname__))
        if cls is None:
            return None
        with torch.device("meta"):
            new = build(cls, old)
        new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
        return new.train(old.training)

    top = convert(model)
    if top is not None:
        return top
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
    return model
