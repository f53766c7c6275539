"""Offload (``memory.offload``): weights live in host memory and come to the GPU only while they are used.

``blocks`` — :class:`BlockStreamer`: the units of ``AvatarDiT.block_sequence()`` (text refiner, double blocks with
their audio adapters, single blocks; 95 % of the DiT's bytes) stay in (pinned) host memory; the small rest is moved
to the GPU once. Before a unit's forward its weights are copied in, and the copy of the *next* unit is started on a
side CUDA stream so that it overlaps this unit's compute; after the forward the device copy is dropped. A cached
forward (deep cache ``reuse``) runs only the last single block: a unit that was not prefetched is copied in on the
spot, so any order of units is correct, the prefetch only makes the full forward's order fast. At most two units
are on the device at once.

Why not diffusers' ``apply_group_offloading``: its streamed mode records the order of groups in the first forward and
from then on lets each group be loaded only by its predecessor; our cached forwards skip all groups but the last,
which would then run with host weights. Its non-streamed mode works but prefetches nothing.

``model`` — :class:`ModuleOffload`: whole modules (the DiT, the VAE) stay in host memory and are moved to the GPU
for the stage that uses them (``with offload.onload(module): ...``) and back after.

Copies are exact (same dtype, same bytes), so outputs are bit-identical to running without offload; with the onload
device ``cpu`` the same code runs on CPU (a real copy in, dropped after), which is what the tests exercise.
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import torch
from torch import nn

log = logging.getLogger(__name__)


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """The host tensor a unit's weight lives in between uses (pinned for asynchronous copies to CUDA)."""
    host = tensor.detach().to("cpu")
    return host.pin_memory() if pin and not host.is_pinned() else host


class BlockStreamer:
    """Streams ``units`` (in their forward order) from host memory to ``device``, prefetching the next one."""

    def __init__(self, units: list[nn.Module], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.units = list(units)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.params = [[p for p in unit.parameters()] for unit in self.units]
        self.host = [[_host_copy(p.data, cuda) for p in params] for params in self.params]
        for params, host in zip(self.params, self.host):
            for param, tensor in zip(params, host):
                param.data = tensor
        for unit in self.units:  # buffers (the fp8 scales) are tiny: resident on the device
            for sub in unit.modules():
                for name, buffer in sub._buffers.items():
                    if buffer is not None:
                        sub._buffers[name] = buffer.to(self.device)
        self.loaded: dict[int, torch.cuda.Event | None] = {}
        """Units whose weights are on the device (or on their way: the event of the side-stream copy)."""
        self.onloads = 0
        self.prefetched = 0
        self._hooks = []
        for index, unit in enumerate(self.units):
            self._hooks.append(unit.register_forward_pre_hook(partial(self._before, index)))
            self._hooks.append(unit.register_forward_hook(partial(self._after, index)))

    # --- copies -------------------------------------------------------------------------------------------------

    def _copy_in(self, index: int) -> None:
        for param, host in zip(self.params[index], self.host[index]):
            param.data = host.to(self.device, non_blocking=True, copy=True)
        self.onloads += 1

    def _prefetch(self, index: int) -> None:
        if index in self.loaded:
            return
        if self.stream is None:
            self._copy_in(index)
            self.loaded[index] = None
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._copy_in(index)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.loaded[index] = event
        self.prefetched += 1

    # --- hooks --------------------------------------------------------------------------------------------------
    # Never traced: with compile=true the compiled block's call runs these hooks, which move weights (state that
    # changes on every call and would make dynamo recompile per unit).

    @torch.compiler.disable
    def _before(self, index: int, module, args) -> None:
        if index not in self.loaded:
            self._copy_in(index)  # on the current stream: nothing to wait for
            self.loaded[index] = None
        else:
            event = self.loaded[index]
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for param in self.params[index]:
                    # Allocated on the side stream, used on this one: keep the allocator from reusing it early.
                    param.data.record_stream(current)
        if index + 1 < len(self.units):
            self._prefetch(index + 1)

    @torch.compiler.disable
    def _after(self, index: int, module, args, output) -> None:
        for param, host in zip(self.params[index], self.host[index]):
            param.data = host
        self.loaded.pop(index, None)

    # --- state --------------------------------------------------------------------------------------------------

    def device_bytes(self) -> int:
        """Bytes of unit weights on the device right now."""
        return sum(p.numel() * p.element_size() for i in self.loaded for p in self.params[i])

    def remove(self) -> None:
        """Detach the hooks and leave every unit's weights in host memory."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def stream_blocks(model: nn.Module, device: torch.device | str) -> BlockStreamer:
    """``memory.offload=blocks`` on ``model`` (an ``AvatarDiT`` in host memory): everything but the units of
    ``block_sequence()`` to ``device``, the units streamed."""
    units = model.block_sequence()
    in_units = {id(p) for unit in units for p in unit.parameters()}
    device = torch.device(device)
    for param in model.parameters():
        if id(param) not in in_units:
            param.data = param.data.to(device)
    unit_modules = {id(m) for unit in units for m in unit.modules()}
    for sub in model.modules():
        if id(sub) not in unit_modules:
            for key, buffer in sub._buffers.items():
                if buffer is not None:
                    sub._buffers[key] = buffer.to(device)
    streamer = BlockStreamer(units, device)
    host = sum(t.numel() * t.element_size() for ts in streamer.host for t in ts)
    log.info(
        "memory: DiT blocks offloaded: %d units (%.2f GB) in %shost memory, streamed to %s one by one with the next "
        "prefetched%s",
        len(units),
        host / 1e9,
        "pinned " if device.type == "cuda" else "",
        device,
        " on a side CUDA stream" if device.type == "cuda" else "",
    )
    return streamer


class ModuleOffload:
    """``memory.offload=model``: modules kept in host memory, on ``device`` only inside ``onload``."""

    def __init__(self, device: torch.device | str, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.enabled = enabled

    def park(self, module: nn.Module) -> nn.Module:
        """Put ``module`` in host memory until it is used (a no-op when disabled)."""
        return module.to("cpu") if self.enabled else module

    @contextlib.contextmanager
    def onload(self, *modules: nn.Module):
        """``modules`` on the device for the duration of the block, back in host memory after."""
        if not self.enabled:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
