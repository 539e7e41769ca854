"""Long-chain sampling: inference mode, chunked memory options, bf16 autocast."""

from __future__ import annotations

import torch

from flash_genie import make_schedule, sample
from flash_genie.model.options import MemoryOptions


def _run(helpers, config, options, autocast=None, dtype=torch.float64):
    model = helpers.random_model(config, dtype=dtype).set_memory_options(options)
    mask = torch.zeros(2, 14, dtype=dtype)
    mask[0, :14], mask[1, :9] = 1, 1
    return sample(model, mask, make_schedule(20, dtype=dtype), 0.6, generator=torch.Generator().manual_seed(3),
                  autocast=autocast)


def test_chunked_sampling_equals_plain(tiny_config, helpers):
    config = tiny_config.replace(numTimesteps=20)
    plain = _run(helpers, config, MemoryOptions(pair_stack_backend="reference"))
    chunked = _run(helpers, config, MemoryOptions.long_sequence(ipa_chunk_size=3, pair_transition_chunk_size=4,
                                                                triangle_attention_chunk_size=2))
    scale = plain.x.abs().max().item()
    assert helpers.report("chunked sampling", chunked.x, plain.x) <= 1e-12 * scale
    # Ordinary tensors come back, usable in autograd (inference tensors would not be).
    assert not chunked.x.is_inference() and not chunked.rots.is_inference()
    (chunked.x * torch.ones(1, requires_grad=True)).sum().backward()


def test_bfloat16_sampling_stays_close_and_float32(tiny_config, helpers):
    config = tiny_config.replace(numTimesteps=20)
    exact = _run(helpers, config, MemoryOptions(), dtype=torch.float32)
    bf16 = _run(helpers, config, MemoryOptions(), autocast=torch.bfloat16, dtype=torch.float32)
    assert bf16.x.dtype == torch.float32 and torch.isfinite(bf16.x).all()
    real = torch.zeros(2, 14, dtype=torch.bool)
    real[0, :14], real[1, :9] = True, True
    err = (bf16.x - exact.x)[real].norm() / exact.x[real].norm()
    print(f"bf16 sample vs fp32: relative error {err:.2e}")
    assert 0 < err < 0.1
