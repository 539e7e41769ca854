"""What the other projects' layouts (:mod:`genie_tk.openfold3`, :mod:`genie_tk.boltz`) share.

* :class:`GatedAttention`: the ``mha.*`` parameters of a triangle attention layer
  whose linears may have no biases;
* :func:`attention_layer` and :func:`trimul`: a layer's forward as one call of
  :func:`genie_tk.triangle_attention_layer` / :func:`genie_tk.triangle_multiplicative_update`
  (so every backend serves every layout);
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

from genie_tk import ops
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


def attention_layer(
    layer: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    bias_weight: torch.Tensor,
    chunk_size: int | None,
    transpose_bias: bool = False,
) -> torch.Tensor:
    """Forward of a triangle attention ``layer`` (``layer_norm``, ``mha`` of
    :class:`GatedAttention`, ``starting``, ``inf``, ``backend``) with triangle-bias
    projection ``bias_weight``."""
    mha = layer.mha
    return ops.triangle_attention_layer(
        x,
        mask,
        layer_norm_weight=layer.layer_norm.weight,
        layer_norm_bias=layer.layer_norm.bias,
        bias_weight=bias_weight,
        q_weight=mha.linear_q.weight,
        k_weight=mha.linear_k.weight,
        v_weight=mha.linear_v.weight,
        gate_weight=mha.linear_g.weight,
        gate_bias=mha.linear_g.bias,
        out_weight=mha.linear_o.weight,
        out_bias=mha.linear_o.bias,
        starting=layer.starting,
        transpose_bias=transpose_bias,
        inf=layer.inf,
        eps=layer.layer_norm.eps,
        chunk_size=chunk_size,
        backend=layer.backend,
    )


def stacked(first: nn.Linear, second: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of the two linears as one ``[2·Ch, C]`` projection (a rows, then b)."""
    weight = torch.cat([first.weight, second.weight])
    if first.bias is None and second.bias is None:
        return weight, None
    biases = [lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in (first, second)]
    return weight, torch.cat(biases)


def trimul(
    z: torch.Tensor,
    mask: torch.Tensor | None,
    outgoing: bool,
    norm_in: nn.LayerNorm,
    p_in: tuple[torch.Tensor, torch.Tensor | None],
    g_in: tuple[torch.Tensor, torch.Tensor | None],
    norm_out: nn.LayerNorm,
    p_out: nn.Linear,
    g_out: nn.Linear,
    chunk_size: int | None,
    backend: str | None,
) -> torch.Tensor:
    """A tri-mul layer's forward from its parts (``p_in``, ``g_in``: stacked ``(weight, bias)``)."""
    return ops.triangle_multiplicative_update(
        z,
        mask,
        "outgoing" if outgoing else "incoming",
        norm_in_weight=norm_in.weight,
        norm_in_bias=norm_in.bias,
        p_in_weight=p_in[0],
        p_in_bias=p_in[1],
        g_in_weight=g_in[0],
        g_in_bias=g_in[1],
        norm_out_weight=norm_out.weight,
        norm_out_bias=norm_out.bias,
        p_out_weight=p_out.weight,
        p_out_bias=p_out.bias,
        g_out_weight=g_out.weight,
        g_out_bias=g_out.bias,
        eps=norm_in.eps,
        chunk_size=chunk_size,
        backend=backend,
    )


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
