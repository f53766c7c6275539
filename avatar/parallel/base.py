"""Sequence-parallel boundary used by the model files.

The DiT never imports ``torch.distributed``. It receives an object with this interface and calls it at its declared
boundaries: shard the image sequence after embedding (every rank holds an equal slice of the tokens of *every* latent
frame, so per-frame work such as the audio adapters and the sampler's per-frame cache never needs whole frames on one
rank), run joint attention, gather the tokens before unpatchify. ``LocalSequence`` is the single-process implementation; ``avatar/parallel/sequence.py``
holds the distributed one (Ulysses, Ring, both).

Shapes: B batch, S image tokens (ref frame + video frames, each ``tokens_per_frame`` long), L text tokens,
H heads, D head dim, C channels.
"""

from __future__ import annotations

import torch

from avatar.attention import attention


def token_range(rank: int, world: int, tokens_per_frame: int) -> tuple[int, int]:
    """``[start, stop)`` of the tokens of every frame that sequence rank ``rank`` of ``world`` holds: an equal slice of
    ``ceil(F / world)`` tokens; positions ``>= tokens_per_frame`` are padding."""
    per = -(-tokens_per_frame // world)
    return rank * per, (rank + 1) * per


def shard_tokens(x: torch.Tensor, num_frames: int, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s slice of every frame of ``x`` (``num_frames`` equal frames along ``dim``), frame-major,
    zero-padded to ``ceil(F / world)`` tokens per frame."""
    tokens_per_frame = x.shape[dim] // num_frames
    if tokens_per_frame * num_frames != x.shape[dim]:
        raise ValueError(f"{x.shape[dim]} tokens along dim {dim} are not {num_frames} equal frames")
    if world == 1:
        return x
    frames = x.unflatten(dim, (num_frames, tokens_per_frame))
    start, stop = token_range(rank, world, tokens_per_frame)
    kept = frames.narrow(dim + 1, min(start, tokens_per_frame), max(0, min(stop, tokens_per_frame) - start))
    missing = (stop - start) - kept.shape[dim + 1]
    if missing:
        shape = list(kept.shape)
        shape[dim + 1] = missing
        kept = torch.cat([kept, kept.new_zeros(shape)], dim=dim + 1)
    return kept.flatten(dim, dim + 1)


def unshard_tokens(parts: list[torch.Tensor], num_frames: int, tokens_per_frame: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tokens`: the shards of every sequence rank, in rank order, to the whole sequence."""
    if len(parts) == 1:
        return parts[0]
    frames = torch.cat([p.unflatten(dim, (num_frames, -1)) for p in parts], dim=dim + 1)
    return frames.narrow(dim + 1, 0, tokens_per_frame).flatten(dim, dim + 1)


class LocalSequence:
    """One process holds the whole sequence: every boundary is the identity."""

    world: int = 1
    rank: int = 0

    def __init__(self, kernel: str = "sdpa") -> None:
        self.kernel = kernel

    def tokens_per_rank(self, tokens_per_frame: int) -> int:
        """Tokens of every frame each rank holds (padded up to an equal slice)."""
        start, stop = token_range(self.rank, self.world, tokens_per_frame)
        return stop - start

    def padding_key_mask(self, num_frames: int, tokens_per_frame: int, device) -> torch.Tensor | None:
        """``[num_frames · tokens_per_rank]`` bool, False on this rank's padding tokens; None when it holds none."""
        start, stop = token_range(self.rank, self.world, tokens_per_frame)
        if stop <= tokens_per_frame:
            return None
        valid = torch.arange(start, stop, device=device) < tokens_per_frame
        return valid.repeat(num_frames)

    def shard_tokens(self, x: torch.Tensor, num_frames: int, dim: int = 1) -> torch.Tensor:
        """This rank's slice of every one of the ``num_frames`` frames of ``x`` along ``dim`` (frame-major)."""
        return shard_tokens(x, num_frames, self.rank, self.world, dim)

    def gather_tokens(self, x: torch.Tensor, num_frames: int, tokens_per_frame: int, dim: int = 1) -> torch.Tensor:
        """Inverse of ``shard_tokens``: every rank gets the whole sequence, padding dropped."""
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
