"""fp8 compute: the block linears of an fp8 checkpoint as scaled fp8 matmuls (``fp8_compute=true``).

The default fp8 path (``FP8Linear.forward``, below) dequantises each weight to the compute dtype
at every call, as the official code does, and runs a bf16 matmul. With fp8 compute the activation is quantised
instead and ``torch._scaled_mm`` multiplies the two fp8 operands on the fp8 tensor cores (compute capability ≥ 8.9),
accumulating in fp32:

- weight: the checkpoint's float8_e4m3fn tensor as stored, with its per-layer scale from the ``_map.pt``;
- activation: one scale per token (row), ``2^ceil(log2(amax / 448))``, computed on the device in the same call (no
  host sync). A power of two makes the division exact, so the only rounding is the one to fp8. Per-token rather than
  per-tensor: a token's result then does not depend on which other tokens share the call (its rank's shard, its
  token chunk), so every parallel plan still renders the same video.

Where this runs is decided before any model is built: ``avatar.validate.check_config`` refuses ``fp8_compute=true``
without ``fp8=true``, off CUDA, below compute capability 8.9 or with a compute dtype other than bf16 (one line each).
The function below runs on CPU too (``torch._scaled_mm`` has a CPU kernel), which is how it is tested here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avatar.weights.layout import FP8_BLOCK_PREFIXES, FP8_DTYPE

#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: fp8 tensor cores: Ada (8.9) and Hopper (9.0) or later.
MIN_CAPABILITY = (8, 9)
#: ``torch._scaled_mm`` wants both matrix dims of the weight divisible by this.
ALIGNMENT = 16
#: Smallest activation scale (an all-zero token gets it; any value divided by it stays finite).
MIN_SCALE = 2.0**-120


def activation_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-row fp8 scales ``[M, 1]`` fp32 of ``x`` ``[M, K]``: the smallest power of two ``s`` with ``amax / s <=
    448``, at least ``MIN_SCALE`` (computed on x's device, no host sync)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    return torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))).clamp(min=MIN_SCALE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` → (float8_e4m3fn ``x / scale``, scales ``[M, 1]`` fp32); ``|x / scale| <= 448`` by construction."""
    scales = activation_scales(x)
    return (x / scales.to(x.dtype)).to(FP8_DTYPE), scales


def scaled_fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale_row: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (weight · scale).T + bias`` with fp8 operands: x ``[..., K]`` (bf16 on CUDA; any float on CPU), weight
    ``[N, K]`` float8_e4m3fn, ``weight_scale_row`` ``[1, N]`` fp32 (the layer's scale repeated); returns x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scales = quantize_rows(rows)
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scales, scale_b=weight_scale_row, out_dtype=x.dtype, use_fast_accum=False
    )
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_compute_supported(device: torch.device | str) -> str | None:
    """None when ``device`` has fp8 tensor cores, else why not (one phrase)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the device is {device.type}, not a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {capability[0]}.{capability[1]} (fp8 tensor cores need ≥ 8.9)"
    return None


def enable_fp8_compute(model: nn.Module, enabled: bool = True) -> list[str]:
    """Switch every ``FP8Linear`` of ``model`` to scaled fp8 matmuls (or back to dequantising); returns their names.
    Raises ``ValueError`` naming the layers whose widths ``torch._scaled_mm`` cannot take."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    if enabled:
        bad = [n for n, m in layers.items() if m.in_features % ALIGNMENT or m.out_features % ALIGNMENT]
        if bad:
            raise ValueError(f"fp8_compute needs linear widths divisible by {ALIGNMENT}; not so: {', '.join(bad)}")
    for layer in layers.values():
        layer.compute_fp8 = enabled
        if enabled:  # [1, N] fp32, contiguous: the weight-side scale operand of torch._scaled_mm
            row = layer.scale.float().reshape(1, 1).expand(1, layer.out_features).contiguous()
            layer.register_buffer("scale_row", row, persistent=False)
    return list(layers)


def quantize_model_fp8(model: nn.Module) -> list[str]:
    """Turn the block linears of a built model into ``FP8Linear`` layers holding its own weights quantised (per-layer
    scale, as ``save_fp8_checkpoint`` writes them): the in-memory twin of saving and loading an fp8 checkpoint."""
    weights = {name: (m.weight.detach(), m.bias) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = convert_to_fp8(model)
    for name in names:
        layer = model.get_submodule(name)
        weight, bias = weights[name]
        quantized, scale = quantize_fp8(weight)
        layer.weight = nn.Parameter(quantized.to(weight.device), requires_grad=False)
        layer.scale = scale.to(weight.device)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return names


# --- the fp8 layer and the per-layer quantisation (the loader's and the converters') ----------------------------


class FP8Linear(nn.Module):
    """nn.Linear whose weight stays float8 in memory and is dequantised at use: ``weight.to(dtype) * scale``; with
    ``compute_fp8`` (``enable_fp8_compute``) a scaled fp8 matmul instead."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        # Not in the state dict: the scale lives in the ``_map.pt`` file.
        self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)
        self.compute_fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_fp8:
            return scaled_fp8_linear(x, self.weight, self.scale_row, self.bias)
        weight = self.weight.to(x.dtype) * self.scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def forward_rows(self, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        """Output features ``[start, stop)`` of ``forward(x)``, dequantising only those weight rows."""
        if self.compute_fp8:
            bias = None if self.bias is None else self.bias[start:stop]
            return scaled_fp8_linear(x, self.weight[start:stop], self.scale_row[:, start:stop], bias)
        weight = self.weight[start:stop].to(x.dtype) * self.scale.to(x.dtype)
        bias = None if self.bias is None else self.bias[start:stop].to(x.dtype)
        return F.linear(x, weight, bias)


def convert_to_fp8(model: nn.Module) -> list[str]:
    """Replace every nn.Linear inside the double/single blocks by an ``FP8Linear``; returns their names."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(FP8_BLOCK_PREFIXES)
    ]
    for name in names:
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        fp8 = FP8Linear(
            linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, linear.weight.device
        )
        setattr(model.get_submodule(parent_name), child, fp8)
    return names


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer fp8: ``scale = amax / 448`` (1 for an all-zero weight), ``weight / scale`` in float8_e4m3fn."""
    amax = weight.detach().float().abs().max()
    scale = amax / FP8_MAX if amax > 0 else torch.ones((), dtype=torch.float32)
    quantized = (weight.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale.float().reshape(())
