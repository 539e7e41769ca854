"""Backend selection: backend=, GENIE_TK_BACKEND, fallback warning, errors, backends()."""

from __future__ import annotations

import warnings

import pytest
import torch

import genie_tk
from genie_tk import _backend
from genie_tk.testing import build


@pytest.fixture
def module():
    return build(genie_tk.TriangleMultiplicationOutgoing, 8, 4, 0, seed=0)


def test_backends_report():
    info = genie_tk.backends()
    assert set(info) == {"tk", "triton", "torch", "reference"}
    assert info["torch"]["available"] and info["reference"]["available"]
    if not torch.cuda.is_available():
        assert info["tk"]["available"] is False
        assert isinstance(info["tk"]["reason"], str) and info["tk"]["reason"]
    # Without a GPU the test session interprets the triton kernels (root conftest.py).
    assert info["triton"]["available"] is (_backend.HAS_TRITON and (torch.cuda.is_available()
                                                                  or _backend.triton_interpreted()))


def test_triton_reasons(monkeypatch):
    monkeypatch.setattr(_backend, "HAS_TRITON", False)
    assert "pip install 'genie-tk[triton]'" in _backend.backends()["triton"]["reason"]
    monkeypatch.setattr(_backend, "HAS_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "TRITON_INTERPRET=1" in _backend.backends()["triton"]["reason"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.backends()["triton"]["reason"] == ""


def test_auto_tries_tk_then_triton_then_warns_with_both_reasons(monkeypatch):
    """auto picks a verified triton kernel when tk cannot run; with neither, the one fallback
    warning names both reasons."""
    monkeypatch.setattr(_backend, "_tk_unavailable_reason", lambda: "no tk here")
    monkeypatch.setattr(_backend, "_triton_unavailable_reason", lambda: "")
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)  # CPU tensors then warn
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ran = []
    verified = _backend.Kernel(check=lambda *a, **k: "", run=lambda *a: ran.append(a) or a[0], verified=True)
    monkeypatch.setitem(_backend.TRITON_KERNELS, "triangle_attention", verified)
    q = torch.randn(1, 3, 1, 3, 4)
    genie_tk.triangle_attention(q, q, q, torch.zeros(1, 1, 3, 3))
    assert genie_tk.last_backend("triangle_attention") == "triton" and len(ran) == 1
    unverified = _backend.Kernel(check=lambda *a, **k: "", run=lambda *a: None, verified=False)
    monkeypatch.setitem(_backend.TRITON_KERNELS, "triangle_attention", unverified)
    monkeypatch.setattr(_backend, "_WARNED", set())
    with pytest.warns(genie_tk.BackendFallbackWarning) as record:
        genie_tk.triangle_attention(q, q, q, torch.zeros(1, 1, 3, 3))
    message = str(record[0].message)
    assert "tk: no tk here" in message and "triton: the triton kernel for triangle_attention has not been verified" in message
    assert genie_tk.last_backend("triangle_attention") == "torch"


def test_triton_by_name_needs_cpu_tensors_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_unavailable_reason", lambda: "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernel = _backend.Kernel(check=lambda *a, **k: "", run=lambda *a: None, verified=False)
    monkeypatch.setitem(_backend.TRITON_KERNELS, "triangle_attention", kernel)
    q = torch.randn(1, 3, 1, 3, 4)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run triangle_attention: inputs are on cpu.*TRITON_INTERPRET=1"):
        genie_tk.triangle_attention(q, q, q, torch.zeros(1, 1, 3, 3), backend="triton")


@pytest.mark.parametrize("name", ["torch", "reference"])
def test_environment_variable_selects_backend(monkeypatch, module, name):
    monkeypatch.setenv("GENIE_TK_BACKEND", name)
    module(torch.randn(1, 5, 5, 8, dtype=torch.float64))
    assert genie_tk.last_backend("triangle_multiplicative_update") == name


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("GENIE_TK_BACKEND", "reference")
    q = torch.randn(1, 3, 1, 3, 4)
    genie_tk.triangle_attention(q, q, q, torch.zeros(1, 1, 3, 3), backend="torch")
    assert genie_tk.last_backend("triangle_attention") == "torch"


def test_unknown_backend_raises(monkeypatch, module):
    z = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    module.backend = "cuda-fast"
    with pytest.raises(ValueError, match="backend='cuda-fast'"):
        module(z)
    module.backend = None
    monkeypatch.setenv("GENIE_TK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GENIE_TK_BACKEND='bogus'"):
        module(z)


def test_forced_tk_on_cpu_raises_with_reason(module):
    module.backend = "tk"
    with pytest.raises(RuntimeError, match=r"backend='tk' cannot run triangle_multiplicative_update: .+"):
        module(torch.randn(1, 5, 5, 8, dtype=torch.float64))


def test_cpu_only_install_runs_cpu_tensors_without_warning(monkeypatch, module):
    monkeypatch.setattr(_backend, "_WARNED", set())
    monkeypatch.setattr(_backend, "HAS_EXTENSION", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(torch.randn(1, 5, 5, 8, dtype=torch.float64))
    assert genie_tk.last_backend("triangle_multiplicative_update") == "torch"


def test_auto_falls_back_with_one_warning(monkeypatch, module):
    monkeypatch.setattr(_backend, "_WARNED", set())
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)
    monkeypatch.setattr(_backend, "_tk_unavailable_reason", lambda: "no CUDA device is visible to torch")
    z = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module(z)
        module(z)
    fallbacks = [w for w in caught if issubclass(w.category, genie_tk.BackendFallbackWarning)]
    assert len(fallbacks) == 1
    assert "torch backend because" in str(fallbacks[0].message)
    assert genie_tk.last_backend("triangle_multiplicative_update") == "torch"


def test_auto_skips_unverified_tk_kernel(monkeypatch):
    """A kernel not yet verified on a GPU runs only when asked for by name."""
    monkeypatch.setattr(_backend, "_tk_unavailable_reason", lambda: "")
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)
    monkeypatch.setattr(_backend, "_WARNED", set())
    kernel = _backend.Kernel(check=lambda *a, **k: "", run=lambda *a: None, verified=False)
    monkeypatch.setitem(_backend.TK_KERNELS, "triangle_attention", kernel)
    q = torch.randn(1, 3, 1, 3, 4)
    with pytest.warns(genie_tk.BackendFallbackWarning, match="not been verified on a GPU"):
        genie_tk.triangle_attention(q, q, q, torch.zeros(1, 1, 3, 3))
    assert genie_tk.last_backend("triangle_attention") == "torch"
    with pytest.raises(RuntimeError, match="inputs are on cpu"):
        genie_tk.triangle_attention(q, q, q, torch.zeros(1, 1, 3, 3), backend="tk")
