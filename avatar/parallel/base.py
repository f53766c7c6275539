"""Sequence-parallel boundary used by the model files.

The DiT never imports ``torch.distributed``. It receives an object with this interface and calls it at its declared
boundaries: shard the image sequence after embedding, run joint attention, gather the tokens before unpatchify.
``LocalSequence`` is the single-process implementation; ``avatar/parallel/sequence.py`` holds the distributed one
(Ulysses, Ring, both).

**Token-level sharding.** The flattened (frame, h, w) image sequence of N tokens is cut into W equal contiguous
slices of ``ceil(N / W)`` tokens (:func:`token_range`); only the end of the sequence is padded, ``W·ceil(N/W) − N <
W`` tokens in all (less than one token per rank; :func:`sequence_padding`). Nothing needs whole frames on one rank:
the audio adapters work per run of tokens of one frame (:func:`frame_runs`), the face mask and RoPE are per token.
The deep cache keeps its rows per absolute latent frame, so it stores them in the *frame-sliced* layout (every rank
an equal slice of every frame, :func:`shard_frames`), which does not depend on where a frame sits in a window;
``to_frame_slices``/``from_frame_slices`` convert at the cache boundary.

**Mask-free joint attention.** Every forward knows its lengths on the host (``JointLengths``: the image tokens of the
whole sequence, the valid text tokens of each batch row, the official ``cu_seqlens`` count). Attention runs over
exactly the image tokens and the valid text tokens, with no mask; the padded text tokens form their own segment (as
in the official varlen call) and attend among themselves; padding image tokens are sliced off before any kernel.

Shapes: B batch, N image tokens of the whole sequence (ref frame + video frames, each ``tokens_per_frame`` long),
S image tokens this rank holds (``ceil(N / W)``), L text tokens, H heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avatar.attention import attention


@dataclass(frozen=True)
class JointLengths:
    """Host-known lengths of one joint attention: ``num_img`` image tokens of the whole sequence (every rank's shard
    together, padding excluded) and ``num_txt`` the valid text tokens of each batch row (a prefix of the text)."""

    num_img: int
    num_txt: tuple[int, ...]

    def text_groups(self) -> list[tuple[slice, int]]:
        """``(batch rows, valid text tokens)`` groups: one group when every row has the same count (the pipeline's
        batch of one), else one group per row."""
        if len(set(self.num_txt)) <= 1:
            return [(slice(None), self.num_txt[0] if self.num_txt else 0)]
        return [(slice(row, row + 1), count) for row, count in enumerate(self.num_txt)]


# --- token-level sharding -----------------------------------------------------------------------------------------


def tokens_per_rank(num_tokens: int, world: int) -> int:
    """Tokens every rank holds (its valid tokens plus padding): ``ceil(num_tokens / world)``."""
    return -(-num_tokens // world)


def token_range(rank: int, world: int, num_tokens: int) -> tuple[int, int]:
    """``[start, stop)`` of the sequence tokens that sequence rank ``rank`` of ``world`` holds (valid tokens only:
    the rank's shard is these followed by ``tokens_per_rank − (stop − start)`` padding rows)."""
    per = tokens_per_rank(num_tokens, world)
    return min(rank * per, num_tokens), min((rank + 1) * per, num_tokens)


def sequence_padding(num_tokens: int, world: int) -> int:
    """Padding tokens of a sequence of ``num_tokens`` over ``world`` ranks (all ranks together): ``< world``."""
    return world * tokens_per_rank(num_tokens, world) - num_tokens


def shard_tokens(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``x`` along ``dim``, zero-padded to ``tokens_per_rank`` rows."""
    if world == 1:
        return x
    num_tokens = x.shape[dim]
    start, stop = token_range(rank, world, num_tokens)
    kept = x.narrow(dim, start, stop - start)
    missing = tokens_per_rank(num_tokens, world) - (stop - start)
    if missing:
        shape = list(kept.shape)
        shape[dim] = missing
        kept = torch.cat([kept, kept.new_zeros(shape)], dim=dim)
    return kept


def unshard_tokens(parts: list[torch.Tensor], num_tokens: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tokens`: the shards of every sequence rank, in rank order, to the whole sequence."""
    if len(parts) == 1:
        return parts[0].narrow(dim, 0, num_tokens)
    return torch.cat(parts, dim=dim).narrow(dim, 0, num_tokens)


def frame_runs(start: int, stop: int, tokens_per_frame: int) -> list[tuple[int, int, int, int]]:
    """The tokens ``[start, stop)`` of a frame-major sequence as runs ``(first_frame, num_frames, begin, end)``:
    local rows ``[begin, end)`` (counted from ``start``) are ``num_frames`` whole frames from ``first_frame`` on, or
    (``num_frames`` = 1) part of one frame. At most a partial head, one run of whole frames and a partial tail."""
    runs = []
    pos = start
    while pos < stop:
        frame, offset = divmod(pos, tokens_per_frame)
        if offset == 0 and stop - pos >= tokens_per_frame:
            count = (stop - pos) // tokens_per_frame
            end = pos + count * tokens_per_frame
        else:
            count, end = 1, min(stop, (frame + 1) * tokens_per_frame)
        runs.append((frame, count, pos - start, end - start))
        pos = end
    return runs


# --- frame-sliced layout (the deep cache) -------------------------------------------------------------------------


def frame_slice(tokens_per_frame: int, world: int) -> int:
    """Tokens of every frame each rank holds in the frame-sliced layout: ``ceil(F / world)``."""
    return -(-tokens_per_frame // world)


def shard_frames(x: torch.Tensor, num_frames: int, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s slice of every one of the ``num_frames`` equal frames of ``x`` along ``dim``:
    ``[..., num_frames, ceil(F / world), ...]`` (frames split out of ``dim``), zero-padded."""
    tokens_per_frame = x.shape[dim] // num_frames
    if tokens_per_frame * num_frames != x.shape[dim]:
        raise ValueError(f"{x.shape[dim]} tokens along dim {dim} are not {num_frames} equal frames")
    frames = x.unflatten(dim, (num_frames, tokens_per_frame))
    per = frame_slice(tokens_per_frame, world)
    start, stop = min(rank * per, tokens_per_frame), min((rank + 1) * per, tokens_per_frame)
    kept = frames.narrow(dim + 1, start, stop - start)
    if stop - start < per:
        shape = list(kept.shape)
        shape[dim + 1] = per - (stop - start)
        kept = torch.cat([kept, kept.new_zeros(shape)], dim=dim + 1)
    return kept


def unshard_frames(parts: list[torch.Tensor], tokens_per_frame: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_frames`: every rank's ``[..., frames, slice, ...]`` in rank order → the flat
    sequence ``[..., frames·F, ...]``."""
    frames = torch.cat(parts, dim=dim + 1) if len(parts) > 1 else parts[0]
    return frames.narrow(dim + 1, 0, tokens_per_frame).flatten(dim, dim + 1)


class LocalSequence:
    """One process holds the whole sequence: every boundary is the identity."""

    world: int = 1
    rank: int = 0

    def __init__(self, kernel: str = "sdpa") -> None:
        self.kernel = kernel

    def tokens_per_rank(self, num_tokens: int) -> int:
        """Rows of this rank's shard of a sequence of ``num_tokens`` (valid tokens plus padding)."""
        return tokens_per_rank(num_tokens, self.world)

    def token_range(self, num_tokens: int) -> tuple[int, int]:
        """``[start, stop)`` of the valid tokens of this rank's shard."""
        return token_range(self.rank, self.world, num_tokens)

    def shard_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of the flat token sequence of ``x`` along ``dim``."""
        return shard_tokens(x, self.rank, self.world, dim)

    def gather_tokens(self, x: torch.Tensor, num_tokens: int, dim: int = 1) -> torch.Tensor:
        """Inverse of ``shard_tokens``: every rank gets the whole sequence of ``num_tokens``, padding dropped."""
        return x

    def to_frame_slices(self, x: torch.Tensor, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        """This rank's shard ``[B, S, C]`` of a sequence of ``num_frames`` equal frames → the frame-sliced layout
        ``[B, num_frames, ceil(F / W), C]`` (the deep cache's)."""
        return x.unflatten(1, (num_frames, -1))

    def from_frame_slices(self, x: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """Inverse of ``to_frame_slices``: ``[B, frames, ceil(F / W), C]`` → this rank's shard ``[B, S, C]``."""
        return x.flatten(1, 2)

    def gather_frame_slices(self, x: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """Every rank's frame slices ``[B, frames, ceil(F / W), ...]`` → the whole frames ``[B, frames·F, ...]`` on
        every rank (the adaptive step cache's reused steps; :func:`unshard_frames`)."""
        return unshard_frames([x], tokens_per_frame)

    def joint_attention(
        self,
        img_q: torch.Tensor,
        img_k: torch.Tensor,
        img_v: torch.Tensor,
        txt_q: torch.Tensor,
        txt_k: torch.Tensor,
        txt_v: torch.Tensor,
        lengths: JointLengths,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over ``[img; valid txt]`` of the whole sequence, padded text tokens in their own segment.
        img_* ``[B, S, H, D]`` (this rank's shard), txt_* ``[B, L, H, D]`` (replicated). Returns ``(img_out [B, S,
        H, D], txt_out [B, L, H, D])``; txt_out is identical on every rank. No kernel gets a mask."""
        num_txt = txt_q.shape[1]
        img_parts, txt_parts = [], []
        for rows, count in lengths.text_groups():
            img_out, txt_out = self._joint(
                img_q[rows],
                img_k[rows],
                img_v[rows],
                txt_q[rows, :count],
                txt_k[rows, :count],
                txt_v[rows, :count],
                lengths.num_img,
            )
            if count < num_txt:  # the padded text tokens' own segment (official cu_seqlens)
                pad_out = attention(txt_q[rows, count:], txt_k[rows, count:], txt_v[rows, count:], kernel=self.kernel)
                txt_out = torch.cat([txt_out, pad_out.to(txt_out.dtype)], dim=1)
            img_parts.append(img_out)
            txt_parts.append(txt_out)
        if len(img_parts) == 1:
            return img_parts[0], txt_parts[0]
        return torch.cat(img_parts), torch.cat(txt_parts)

    def _joint(self, img_q, img_k, img_v, txt_q, txt_k, txt_v, num_img: int):
        """Unmasked attention over ``[img; txt]`` (every text token valid); ``(img_out, txt_out)``."""
        num_q = img_q.shape[1]
        out = attention(
            torch.cat([img_q, txt_q], dim=1),
            torch.cat([img_k, txt_k], dim=1),
            torch.cat([img_v, txt_v], dim=1),
            kernel=self.kernel,
        )
        return out[:, :num_q], out[:, num_q:]
