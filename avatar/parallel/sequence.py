"""Sequence parallelism on torch.distributed: Ulysses (all-to-all over heads), Ring (k/v blocks passed around with
log-sum-exp merging), and both together (USP: Ulysses inside, Ring across).

Shapes: B batch, N image tokens of the whole sequence, S = ceil(N / (R·U)) image tokens held by this rank, L text
tokens (replicated), H heads, D head dim, U ulysses size, R ring size, h = H/U heads after the head scatter.

Sharding is token-level (``avatar/parallel/base.py``): sequence rank s = ring_rank·U + ulysses_rank holds tokens
``[s·S, (s+1)·S)`` of the flat sequence; only the last rank(s) hold padding (fewer than R·U tokens in all). After the
Ulysses all-to-all, ring rank r holds the contiguous tokens ``[r·U·S, (r+1)·U·S)`` in sequence order, so the padding
is at the end of the last ring block: it is sliced off before every kernel (host-known lengths), never masked.

Collectives per ``joint_attention`` call and text group (all counted in ``avatar.parallel.comm``):

- Ulysses: 1 all_to_all (q, k, v packed into one buffer), 1 all_to_all back (image output), 1 all_gather (text
  output heads).
- Ring: R−1 isend/irecv pairs (k and v packed), 1 all_gather of the text queries' partial results.
- USP: the sum of both.

Text tokens in Ring: every rank holds all text keys; image queries attend to the valid ones once (at the local step),
and valid text queries attend to them only on ring rank 0. Each rank's text-query partial ``(out, lse)`` over its own
image block is all-gathered and merged in ring-rank order, so the text output is bit-identical on every rank. The
padded text tokens' own segment is computed on every rank without communication (``LocalSequence.joint_attention``).
"""

from __future__ import annotations

import logging

import torch

from avatar.attention import attention
from avatar.attention.lse import attention_with_lse, merge_partials
from avatar.parallel import comm
from avatar.parallel.base import LocalSequence, shard_frames, shard_tokens, unshard_frames, unshard_tokens

logger = logging.getLogger(__name__)


class DistributedSequence(LocalSequence):
    """The ``LocalSequence`` interface over a ring group and a ulysses group (either may be None = size 1)."""

    def __init__(self, ring_group=None, ulysses_group=None, kernel: str = "sdpa") -> None:
        self.kernel = kernel
        self.ring_group = ring_group
        self.ulysses_group = ulysses_group
        self.ring_size = comm.group_size(ring_group)
        self.ring_rank = comm.group_rank(ring_group)
        self.ulysses_size = comm.group_size(ulysses_group)
        self.ulysses_rank = comm.group_rank(ulysses_group)
        self.world = self.ring_size * self.ulysses_size
        self.rank = self.ring_rank * self.ulysses_size + self.ulysses_rank

    def __repr__(self) -> str:
        return f"DistributedSequence(ring={self.ring_size}, ulysses={self.ulysses_size}, kernel={self.kernel!r})"

    # --- tokens ------------------------------------------------------------------------------------------------------

    def _all_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every sequence rank's ``x`` (equal shapes), in sequence-rank order."""
        x = x.contiguous()
        parts = [x]
        if self.ulysses_size > 1:
            parts = comm.all_gather(x, self.ulysses_group)
        if self.ring_size > 1:
            # Sequence rank s = ring_rank·U + ulysses_rank: gather the ulysses-ordered stack over the ring.
            stacked = torch.stack(parts)
            parts = [p for block in comm.all_gather(stacked, self.ring_group) for p in block.unbind(0)]
        return parts

    def gather_tokens(self, x: torch.Tensor, num_tokens: int, dim: int = 1) -> torch.Tensor:
        """Inverse of ``shard_tokens``: every rank gets the whole sequence, padding dropped."""
        return unshard_tokens(self._all_parts(x), num_tokens, dim)

    def to_frame_slices(self, x: torch.Tensor, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        """This rank's token shard ``[B, S, C]`` → its frame slices ``[B, num_frames, ceil(F / W), C]`` (one gather of
        the sequence; the deep cache's write steps only)."""
        full = self.gather_tokens(x, num_frames * tokens_per_frame)
        return shard_frames(full, num_frames, self.rank, self.world)

    def from_frame_slices(self, x: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """Inverse of ``to_frame_slices`` (one gather; the deep cache's cached steps only)."""
        full = unshard_frames(self._all_parts(x), tokens_per_frame)
        return shard_tokens(full, self.rank, self.world)

    def gather_frame_slices(self, x: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """Every rank's frame slices → the whole frames on every rank (one gather)."""
        return unshard_frames(self._all_parts(x), tokens_per_frame)

    # --- attention ---------------------------------------------------------------------------------------------------

    def _joint(self, img_q, img_k, img_v, txt_q, txt_k, txt_v, num_img: int):
        """Unmasked attention over the whole ``[img; txt]`` sequence of the group (every text token valid). img_*
        ``[B, S, H, D]`` this rank's tokens, txt_* ``[B, n, H, D]`` replicated; returns ``(img_out [B, S, H, D],
        txt_out [B, n, H, D])`` with txt_out identical on every rank."""
        num_local, num_heads = img_q.shape[1], img_q.shape[2]
        if num_heads % self.ulysses_size != 0:
            raise ValueError(f"{num_heads} heads are not divisible by ulysses={self.ulysses_size}")
        if self.ulysses_size > 1:
            q, k, v = self._scatter_heads(img_q, img_k, img_v)
            heads = num_heads // self.ulysses_size
            first = self.ulysses_rank * heads
            tq, tk, tv = (t[:, :, first : first + heads] for t in (txt_q, txt_k, txt_v))
        else:
            q, k, v = img_q, img_k, img_v
            tq, tk, tv = txt_q, txt_k, txt_v

        if self.ring_size > 1:
            img_out, txt_out = self._ring(q, k, v, tq, tk, tv, num_img)
        else:
            valid = min(num_img, q.shape[1])  # the gathered sequence in token order: the padding is its tail
            out = attention(
                torch.cat([q[:, :valid], tq], dim=1),
                torch.cat([k[:, :valid], tk], dim=1),
                torch.cat([v[:, :valid], tv], dim=1),
                kernel=self.kernel,
            )
            img_out, txt_out = _pad_rows(out[:, :valid], q.shape[1]), out[:, valid:]

        if self.ulysses_size > 1:
            img_out = self._gather_heads(img_out, num_local)
            txt_out = torch.cat(comm.all_gather(txt_out.contiguous(), self.ulysses_group), dim=2)
        return img_out, txt_out

    def _scatter_heads(self, q, k, v):
        """Ulysses: ``[B, S, H, D]`` × 3 → ``[B, U·S, h, D]`` × 3 in one all_to_all (slice j of the send buffer holds
        head group j)."""
        size = self.ulysses_size
        batch, num_img, num_heads, head_dim = q.shape
        heads = num_heads // size

        def by_destination(t: torch.Tensor) -> torch.Tensor:  # [B, S, H, D] -> [U, B·S·h·D]
            return t.reshape(batch, num_img, size, heads, head_dim).permute(2, 0, 1, 3, 4).reshape(size, -1)

        send = torch.cat([by_destination(q), by_destination(k), by_destination(v)], dim=1)
        recv = torch.empty_like(send)
        comm.all_to_all_single(recv, send, self.ulysses_group)

        numel = batch * num_img * heads * head_dim

        def from_source(part: torch.Tensor) -> torch.Tensor:  # [U, B·S·h·D] -> [B, U·S, h, D]
            t = part.reshape(size, batch, num_img, heads, head_dim).permute(1, 0, 2, 3, 4)
            return t.reshape(batch, size * num_img, heads, head_dim)

        q, k, v = (from_source(recv[:, i * numel : (i + 1) * numel]) for i in range(3))
        return q, k, v

    def _gather_heads(self, out: torch.Tensor, num_img: int) -> torch.Tensor:
        """Ulysses inverse: ``[B, U·S, h, D]`` → ``[B, S, H, D]`` (sequence slice j goes back to rank j)."""
        size = self.ulysses_size
        batch, _, heads, head_dim = out.shape
        send = out.reshape(batch, size, num_img, heads, head_dim).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        comm.all_to_all_single(recv, send, self.ulysses_group)
        # recv[j] = my tokens for head group j
        return recv.permute(1, 2, 0, 3, 4).reshape(batch, num_img, size * heads, head_dim)

    def _ring(self, q, k, v, tq, tk, tv, num_img: int):
        """Ring attention over the ring group; returns ``(img_out [B, U·S, h, D], txt_out [B, n, h, D])``. Block r
        holds ``valid(r)`` real tokens followed by padding; each block is sliced to them before the kernel."""
        size, rank = self.ring_size, self.ring_rank
        block = q.shape[1]

        def valid(ring_rank: int) -> int:
            return max(0, min(num_img - ring_rank * block, block))

        num_elems = k.numel()
        dtype = q.dtype
        current = torch.cat([k.reshape(-1), v.reshape(-1)])
        spare = torch.empty_like(current)
        own_q = q[:, : valid(rank)]

        img_out = img_lse = None
        txt_partial = None
        for step in range(size):
            requests = []
            if step < size - 1:
                # Post the next transfer first so it overlaps this block's compute.
                requests = comm.send_recv(current, (rank + 1) % size, spare, (rank - 1) % size, self.ring_group)
            count = valid((rank - step) % size)
            block_k = current[:num_elems].view_as(k)[:, :count]
            block_v = current[num_elems:].view_as(v)[:, :count]
            if step == 0:
                # Image queries: own block plus the text keys (counted here, once).
                keys, values = torch.cat([block_k, tk], dim=1), torch.cat([block_v, tv], dim=1)
                partial = _partial(own_q, keys, values, self.kernel)
                # Text queries: own image block, plus the text keys on ring rank 0 only.
                if rank == 0:
                    txt_partial = _partial(tq, keys, values, self.kernel)
                else:
                    txt_partial = _partial(tq, block_k, block_v, self.kernel)
                if txt_partial is None:
                    txt_partial = _neutral(tq)
            else:
                partial = _partial(own_q, block_k, block_v, self.kernel)
            if partial is not None:
                img_out, img_lse = merge_partials(img_out, img_lse, *partial)
            for request in requests:
                request.wait()
            if requests:
                current, spare = spare, current
        img_out = _neutral(own_q)[0] if img_out is None else img_out
        txt_out = self._merge_text(*txt_partial) if tq.shape[1] else tq.float()
        return _pad_rows(img_out.to(dtype), block), txt_out.to(dtype)

    def _merge_text(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """All-gather the text queries' partial ``(out, lse)`` over the ring and merge them in ring-rank order."""
        packed = torch.cat([out.float().reshape(-1), lse.float().reshape(-1)])
        merged_out = merged_lse = None
        for part in comm.all_gather(packed, self.ring_group):
            part_out = part[: out.numel()].view(out.shape)
            part_lse = part[out.numel() :].view(lse.shape)
            merged_out, merged_lse = merge_partials(merged_out, merged_lse, part_out, part_lse)
        return merged_out


def _partial(q, k, v, kernel: str):
    """``attention_with_lse`` of one block (no mask), or None when there is no query or no key."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return None
    return attention_with_lse(q, k, v, kernel=kernel)


def _neutral(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of queries that saw no key: out 0, lse −inf (neutral in a merge)."""
    batch, num_q, heads, head_dim = q.shape
    lse = torch.full((batch, heads, num_q), float("-inf"), device=q.device)
    return q.new_zeros((batch, num_q, heads, head_dim), dtype=torch.float32), lse


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` ``[B, n, ...]`` with zero rows appended up to ``rows``."""
    if x.shape[1] == rows:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], rows - x.shape[1], *x.shape[2:]))], dim=1)
