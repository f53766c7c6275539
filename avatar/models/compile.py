"""``compile=true``: regional ``torch.compile`` of the DiT's transformer blocks.

Each double-stream and single-stream block is compiled with ``dynamic=False``; the blocks of a kind share one
``forward``, and Dynamo traces modules with their parameters as graph inputs, so the first block of each kind
compiles once and every other block of that kind reuses its graph (``compile_blocks`` returns what was compiled;
the test counts the graphs). The embedders, the text refiner, the audio adapters and the final layer stay eager:
they run once per forward and are a small part of its time. A new token-grid shape compiles once more (shapes are
static: ``dynamic=False``).

Off by default: the speed-up is to be measured on a GPU (tests/gpu/check.sh); on the CPU the compiled forward
matches eager to fp32 rounding (inductor's fused norms reduce in another order).
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, *, mode: str | None = None) -> list[str]:
    """Compile every block of ``model.double_blocks`` and ``model.single_blocks`` in place (``dynamic=False``);
    returns the names of the compiled blocks."""
    names = []
    for kind in ("double_blocks", "single_blocks"):
        for index, block in enumerate(getattr(model, kind)):
            block.compile(dynamic=False, mode=mode)
            names.append(f"{kind}.{index}")
    return names
