"""fp8 compute (``fp8_compute=true``): per-token activation scales, the scaled fp8 matmul against its own operands,
a tiny model against the dequantising fp8 path, and the refusal where it cannot run (all on CPU, where
``torch._scaled_mm`` has a kernel)."""

from __future__ import annotations

import pytest
import torch

from avatar.compose import compose
from avatar.io.errors import InputError
from avatar.models.transformer import AvatarDiT
from avatar.perf import random_dit_inputs, relative_error
from avatar.validate import check_config
from avatar.weights.fp8 import (
    FP8_MAX,
    MIN_SCALE,
    FP8Linear,
    activation_scales,
    enable_fp8_compute,
    quantize_model_fp8,
    quantize_rows,
    scaled_fp8_linear,
)


def test_activation_scales_are_powers_of_two_that_fit_448():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 7.0, 3e4, 0.0])[:, None]
    scales = activation_scales(x)
    assert scales.shape == (6, 1) and scales.dtype == torch.float32
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))  # powers of two
    amax = x.abs().amax(dim=1, keepdim=True)
    ratio = amax[:5] / scales[:5]
    assert (ratio <= FP8_MAX).all() and (ratio > FP8_MAX / 2).all()  # the smallest such power
    assert scales[5, 0] == MIN_SCALE  # an all-zero token
    xq, _ = quantize_rows(x)
    back = xq.float() * scales
    assert torch.equal(back[5], torch.zeros(32))
    # e4m3 keeps 3 mantissa bits: relative rounding ≤ 2^-4 for normal values; subnormals are 2^-9 · scale apart.
    assert ((back - x).abs() <= x.abs() * 2**-4 + scales * 2**-9).all()


def test_scaled_linear_is_the_product_of_its_fp8_operands():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=g)
    weight = (torch.randn(48, 64, generator=g) * 8).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.03)
    bias = torch.randn(48, generator=g)
    out = scaled_fp8_linear(x, weight, scale.reshape(1, 1).expand(1, 48).contiguous(), bias)
    xq, x_scales = quantize_rows(x.reshape(-1, 64))
    expected = (xq.float() * x_scales) @ (weight.float() * scale).t() + bias
    assert out.shape == (2, 5, 48)
    torch.testing.assert_close(out.reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    # Per-token scales: a token's output does not depend on the others in the call.
    alone = scaled_fp8_linear(x[:1, 2:3], weight, scale.reshape(1, 1).expand(1, 48).contiguous(), bias)
    torch.testing.assert_close(alone[0, 0], out[0, 2], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_tiny_model_fp8_compute_close_to_dequantised_path():
    cfg = compose(["model=tiny"]).model
    torch.manual_seed(0)
    model = AvatarDiT(cfg).eval()
    inputs = random_dit_inputs(cfg, 2, 8, 8)
    exact = model(**inputs)
    names = quantize_model_fp8(model)
    assert names and all(isinstance(model.get_submodule(n), FP8Linear) for n in names)
    dequantised = model(**inputs)
    assert enable_fp8_compute(model) == names
    computed = model(**inputs)
    model.set_token_chunk(7)  # per-token scales: chunking changes nothing beyond the matmul's own rounding
    chunked = model(**inputs)
    model.set_token_chunk(None)
    enable_fp8_compute(model, enabled=False)
    assert torch.equal(model(**inputs), dequantised)
    error_dequantised, error_compute = relative_error(dequantised, exact), relative_error(computed, exact)
    assert 0 < error_dequantised < 0.02, error_dequantised
    assert 0 < error_compute <= 2 * error_dequantised + 0.01, (error_compute, error_dequantised)
    assert relative_error(chunked, computed) < 1e-5


def test_fp8_compute_refused_where_it_cannot_run():
    with pytest.raises(InputError, match=r"^fp8_compute=true needs fp8=true"):
        check_config(compose(["model=tiny", "fp8_compute=true"]))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"^fp8_compute=true needs a GPU with fp8 tensor cores .* cpu"):
            check_config(compose(["model=tiny", "fp8=true", "fp8_compute=true"]))
    with pytest.raises(InputError, match=r"fp8 tensor cores"):
        check_config(compose(["model=tiny", "fp8=true", "fp8_compute=true", "device=cpu"]))
    check_config(compose(["model=tiny", "fp8=true"]))  # the dequantising path runs anywhere


def test_parity_check_of_the_gpu_script_passes_on_cpu():
    """``avatar.perf.fp8_compute_parity`` (what tests/gpu/check.sh calls on a GPU) in bf16 on the CPU kernel."""
    from avatar.perf import fp8_compute_parity

    result = fp8_compute_parity(compose(["model=tiny"]).model, device="cpu", height=8, width=8, repeats=1)
    assert result["ok"], result
    assert 0 < result["error_compute_vs_dequantised"] < 0.02, result  # measured 0.57 % (dequantised: 0.59 %)


@torch.no_grad()
def test_load_dit_switches_the_loaded_fp8_layers_to_fp8_compute(tmp_path):
    from avatar.config import OFFICIAL_DIT_FP8_FILE
    from avatar.weights.load import load_dit, save_fp8_checkpoint

    cfg = compose(["model=tiny"]).model
    torch.manual_seed(2)
    save_fp8_checkpoint(AvatarDiT(cfg).state_dict(), tmp_path / OFFICIAL_DIT_FP8_FILE)
    default = load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu", fp8=True)
    computed = load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu", fp8=True, fp8_compute=True)
    layers = [m for m in computed.modules() if isinstance(m, FP8Linear)]
    assert layers and all(m.compute_fp8 for m in layers)
    assert not any(m.compute_fp8 for m in default.modules() if isinstance(m, FP8Linear))
    inputs = random_dit_inputs(cfg, 2, 8, 8)
    assert relative_error(computed(**inputs), default(**inputs)) < 0.02
