"""Sequence-parallel boundary used by the model files.

The DiT never imports ``torch.distributed``. It receives an object with this interface and calls it at its declared
boundaries: shard the image sequence along whole latent frames after embedding, run joint attention, gather the
frames before unpatchify. ``LocalSequence`` is the single-process implementation; ``avatar/parallel/sequence.py``
holds the distributed one (Ulysses, Ring, both).

Shapes: B batch, S image tokens (ref frame + video frames, each ``tokens_per_frame`` long), L text tokens,
H heads, D head dim, C channels.
"""

from __future__ import annotations

import torch

from avatar.attention import attention


class LocalSequence:
    """One process holds the whole sequence: every boundary is the identity."""

    world: int = 1
    rank: int = 0

    def __init__(self, kernel: str = "sdpa") -> None:
        self.kernel = kernel

    def frames_per_rank(self, num_frames: int) -> int:
        """Frames each rank holds after padding ``num_frames`` up to a multiple of ``world``."""
        return -(-num_frames // self.world)

    def frame_range(self, num_frames: int) -> tuple[int, int]:
        """Global ``[start, stop)`` frame indices held by this rank; indices ``>= num_frames`` are padding."""
        per = self.frames_per_rank(num_frames)
        return self.rank * per, (self.rank + 1) * per

    def shard_frames(self, x: torch.Tensor, num_frames: int, dim: int = 1) -> torch.Tensor:
        """Split ``x`` (``num_frames`` equal frames along ``dim``) into this rank's frames, zero-padded."""
        return x

    def gather_frames(self, x: torch.Tensor, num_frames: int, dim: int = 1) -> torch.Tensor:
        """Inverse of ``shard_frames``: every rank gets all ``num_frames`` frames, padding dropped."""
        return x

    def joint_attention(
        self,
        img_q: torch.Tensor,
        img_k: torch.Tensor,
        img_v: torch.Tensor,
        txt_q: torch.Tensor,
        txt_k: torch.Tensor,
        txt_v: torch.Tensor,
        img_key_mask: torch.Tensor | None,
        txt_key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over ``[img; txt]``. img_* ``[B, S_local, H, D]`` (this rank's frames), txt_* ``[B, L, H, D]``
        (replicated). ``img_key_mask`` ``[S_local]`` bool (False for padding tokens) or None; ``txt_key_mask``
        ``[B, L]`` bool (False for text tokens no image token may see) or None. Returns ``(img_out [B, S_local, H, D],
        txt_out [B, L, H, D])``; txt_out is identical on every rank."""
        num_img = img_q.shape[1]
        q = torch.cat([img_q, txt_q], dim=1)
        k = torch.cat([img_k, txt_k], dim=1)
        v = torch.cat([img_v, txt_v], dim=1)
        key_mask = _joint_key_mask(img_key_mask, txt_key_mask, img_q.shape[0], num_img, txt_q.shape[1], img_q.device)
        out = attention(q, k, v, key_mask=key_mask, kernel=self.kernel)
        return out[:, :num_img], out[:, num_img:]


def _joint_key_mask(
    img_key_mask: torch.Tensor | None,
    txt_key_mask: torch.Tensor | None,
    batch: int,
    num_img: int,
    num_txt: int,
    device: torch.device,
) -> torch.Tensor | None:
    if img_key_mask is None and txt_key_mask is None:
        return None
    img = (
        torch.ones(batch, num_img, dtype=torch.bool, device=device)
        if img_key_mask is None
        else img_key_mask.to(torch.bool).expand(batch, num_img)
    )
    txt = (
        torch.ones(batch, num_txt, dtype=torch.bool, device=device)
        if txt_key_mask is None
        else txt_key_mask.to(torch.bool)
    )
    return torch.cat([img, txt], dim=1)
