"""Conditioning reaches every rank as tensors: a small pickled header, then one broadcast per dtype; every rank gets
bit-identical tensors with their dtypes and shapes, and the other fields (gloo, 2 ranks)."""

from __future__ import annotations

import pytest
import torch

from tests.utils.spawn import spawn


def make_conditioning():
    from avatar.pipeline.denoise import Conditioning

    g = torch.Generator().manual_seed(3)
    return Conditioning(
        audio_feats=torch.randn(9, 10, 3, 8, generator=g),
        face_mask=torch.rand(1, 1, 1, 6, 6, generator=g) > 0.5,  # bool travels as bytes
        text_states=torch.randn(1, 12, 32, generator=g),
        text_mask=torch.arange(12)[None] < 7,
        text_pooled=torch.randn(1, 16, generator=g).double(),
        neg_text_states=torch.randn(1, 12, 32, generator=g).half(),
        neg_text_mask=(torch.arange(12)[None] < 3).long(),
        neg_text_pooled=torch.randn(1, 16, generator=g),
        ref_latents=torch.randn(1, 4, 3, 6, 6, generator=g),
        num_frames=33,
        face_found=False,
    )


def _receive(rank: int, world: int):
    from avatar.parallel import comm
    from avatar.pipeline.topology import Topology

    topo = Topology(rank=rank, world=world)
    with comm.counting() as counts:
        cond = topo.broadcast_fields(make_conditioning() if rank == 0 else None, src=0)
    return cond, counts.snapshot()


@pytest.mark.timeout(120)
def test_conditioning_broadcast_as_tensors_is_bit_identical():
    expected = make_conditioning()
    tensor_bytes = sum(v.numel() * v.element_size() for v in vars(expected).values() if isinstance(v, torch.Tensor))
    results = spawn(2, _receive)
    for rank, (cond, counts) in enumerate(results):
        assert type(cond) is type(expected)
        for name, value in vars(expected).items():
            got = getattr(cond, name)
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and torch.equal(got, value), (rank, name)
            else:
                assert got == value, (rank, name)
        calls, sent = counts["broadcast"]
        # header size + header + one per dtype (float32, bool, float64, float16, int64)
        assert calls == 2 + 5, counts
        if rank == 0:
            assert tensor_bytes <= sent < tensor_bytes + 2048, (sent, tensor_bytes)  # only the header is pickled
        else:
            assert sent == 0
