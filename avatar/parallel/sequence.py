"""Sequence parallelism on torch.distributed: Ulysses (all-to-all over heads), Ring (k/v blocks passed around with
log-sum-exp merging), and both together (USP: Ulysses inside, Ring across).

Shapes: B batch, S image tokens held by this rank, L text tokens (replicated), H heads, D head dim, U ulysses size,
R ring size, h = H/U heads after the head scatter.

Sharding is within frames (``avatar/parallel/base.py``): sequence rank s = ring_rank·U + ulysses_rank holds tokens
``[s·n, (s+1)·n)`` of every latent frame, n = ceil(F / (R·U)); where R·U does not divide the F tokens of a frame the
slices are zero-padded and the padding is masked as keys, so any token count and any world size work. After the
Ulysses all-to-all, ring rank r holds the tokens of sequence ranks ``r·U … r·U+U−1``.

Collectives per ``joint_attention`` call (all counted in ``avatar.parallel.comm``):

- Ulysses: 1 all_to_all (q, k, v and the image key mask packed into one buffer), 1 all_to_all back (image output),
  1 all_gather (text output heads).
- Ring: R−1 isend/irecv pairs (k, v and the key mask packed), 1 all_gather of the text queries' partial results.
- USP: the sum of both.

Text tokens in Ring: every rank holds all text keys; image queries attend to them once (at the local step), and
text queries attend to them only on ring rank 0. Each rank's text-query partial ``(out, lse)`` over its own image
block is all-gathered and merged in ring-rank order, so the text output is bit-identical on every rank.
"""

from __future__ import annotations

import logging

import torch

from avatar.attention import attention
from avatar.attention.lse import attention_with_lse, merge_partials
from avatar.parallel import comm
from avatar.parallel.base import LocalSequence, unshard_tokens

logger = logging.getLogger(__name__)

BACKENDS = ("native", "xfuser")


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

    def shard_tokens(self, x: torch.Tensor, num_frames: int, dim: int = 1) -> torch.Tensor:
        """This rank's slice of every frame (``LocalSequence.shard_tokens``); remembers the layout so that Ulysses can
        put the gathered sequence back into token order."""
        self._layout = (num_frames, x.shape[dim] // num_frames)
        return super().shard_tokens(x, num_frames, dim)

    def gather_tokens(self, x: torch.Tensor, num_frames: int, tokens_per_frame: int, dim: int = 1) -> torch.Tensor:
        """Inverse of ``shard_tokens``: every rank gets the whole sequence, padding dropped."""
        x = x.contiguous()
        parts = [x]
        if self.ulysses_size > 1:
            parts = comm.all_gather(x, self.ulysses_group)
        if self.ring_size > 1:
            # Sequence rank s = ring_rank·U + ulysses_rank: gather the ulysses-ordered stack over the ring.
            stacked = torch.stack(parts)
            parts = [p for block in comm.all_gather(stacked, self.ring_group) for p in block.unbind(0)]
        return unshard_tokens(parts, num_frames, tokens_per_frame, dim)

    # --- attention ---------------------------------------------------------------------------------------------------

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
        """Attention over the whole ``[img; txt]`` sequence of the group (see ``LocalSequence.joint_attention``).
        img_* ``[B, S, H, D]`` this rank's tokens, txt_* ``[B, L, H, D]`` replicated; returns ``(img_out [B, S, H,
        D], txt_out [B, L, H, D])`` with txt_out identical on every rank."""
        batch, num_img, num_heads, _ = img_q.shape
        num_txt = txt_q.shape[1]
        device = img_q.device
        img_mask = _img_mask(img_key_mask, batch, num_img, device)
        txt_mask = (
            torch.ones(batch, num_txt, dtype=torch.bool, device=device)
            if txt_key_mask is None
            else txt_key_mask.to(torch.bool).expand(batch, num_txt)
        )
        if num_heads % self.ulysses_size != 0:
            raise ValueError(f"{num_heads} heads are not divisible by ulysses={self.ulysses_size}")
        # Ulysses alone: the gathered sequence is put back into token order with the padding dropped, so attention
        # sees exactly one process's sequence (bit-identical results); under Ring the blocks stay as they are.
        layout = getattr(self, "_layout", None) if self.ring_size == 1 else None
        if layout is not None and num_img != layout[0] * self.tokens_per_rank(layout[1]):
            layout = None
        if self.ulysses_size > 1:
            q, k, v, mask = self._scatter_heads(img_q, img_k, img_v, img_mask)
            if layout is not None:
                q, k, v = (self._to_token_order(t, *layout) for t in (q, k, v))
                mask = torch.ones(batch, q.shape[1], dtype=torch.bool, device=device)
            heads = num_heads // self.ulysses_size
            first = self.ulysses_rank * heads
            tq, tk, tv = (t[:, :, first : first + heads] for t in (txt_q, txt_k, txt_v))
        else:
            q, k, v, mask = img_q, img_k, img_v, img_mask
            tq, tk, tv = txt_q, txt_k, txt_v

        if self.ring_size > 1:
            img_out, txt_out = self._ring(q, k, v, mask, tq, tk, tv, txt_mask)
        else:
            num_q = q.shape[1]
            out = attention(
                torch.cat([q, tq], dim=1),
                torch.cat([k, tk], dim=1),
                torch.cat([v, tv], dim=1),
                key_mask=torch.cat([mask, txt_mask], dim=1),
                kernel=self.kernel,
            )
            img_out, txt_out = out[:, :num_q], out[:, num_q:]

        if self.ulysses_size > 1:
            if layout is not None:
                img_out = self._from_token_order(img_out, *layout)
            img_out = self._gather_heads(img_out, num_img)
            txt_out = torch.cat(comm.all_gather(txt_out.contiguous(), self.ulysses_group), dim=2)
        return img_out, txt_out

    def _to_token_order(self, t: torch.Tensor, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        """``[B, U·T·n, h, D]`` as gathered (ulysses rank, frame, slice position) → ``[B, T·F, h, D]`` in token order,
        padding dropped."""
        batch, _, heads, head_dim = t.shape
        size, per = self.ulysses_size, self.tokens_per_rank(tokens_per_frame)
        t = t.reshape(batch, size, num_frames, per, heads, head_dim).transpose(1, 2)
        t = t.reshape(batch, num_frames, size * per, heads, head_dim)[:, :, :tokens_per_frame]
        return t.reshape(batch, num_frames * tokens_per_frame, heads, head_dim)

    def _from_token_order(self, t: torch.Tensor, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        """Inverse of :meth:`_to_token_order` (zero rows at the padding)."""
        batch, _, heads, head_dim = t.shape
        size, per = self.ulysses_size, self.tokens_per_rank(tokens_per_frame)
        t = t.reshape(batch, num_frames, tokens_per_frame, heads, head_dim)
        if size * per > tokens_per_frame:
            pad = t.new_zeros(batch, num_frames, size * per - tokens_per_frame, heads, head_dim)
            t = torch.cat([t, pad], dim=2)
        t = t.reshape(batch, num_frames, size, per, heads, head_dim).transpose(1, 2)
        return t.reshape(batch, size * num_frames * per, heads, head_dim)

    def _scatter_heads(self, q, k, v, mask):
        """Ulysses: ``[B, S, H, D]`` × 3 + mask ``[B, S]`` → ``[B, U·S, h, D]`` × 3 + ``[B, U·S]`` in one
        all_to_all (slice j of the send buffer holds head group j and a copy of the mask)."""
        size = self.ulysses_size
        batch, num_img, num_heads, head_dim = q.shape
        heads = num_heads // size

        def by_destination(t: torch.Tensor) -> torch.Tensor:  # [B, S, H, D] -> [U, B·S·h·D]
            return t.reshape(batch, num_img, size, heads, head_dim).permute(2, 0, 1, 3, 4).reshape(size, -1)

        mask_part = mask.to(q.dtype).reshape(1, -1).expand(size, -1)
        send = torch.cat([by_destination(q), by_destination(k), by_destination(v), mask_part], dim=1)
        recv = torch.empty_like(send)
        comm.all_to_all_single(recv, send, self.ulysses_group)

        numel = batch * num_img * heads * head_dim

        def from_source(part: torch.Tensor) -> torch.Tensor:  # [U, B·S·h·D] -> [B, U·S, h, D]
            t = part.reshape(size, batch, num_img, heads, head_dim).permute(1, 0, 2, 3, 4)
            return t.reshape(batch, size * num_img, heads, head_dim)

        q, k, v = (from_source(recv[:, i * numel : (i + 1) * numel]) for i in range(3))
        mask = recv[:, 3 * numel :].reshape(size, batch, num_img).permute(1, 0, 2).reshape(batch, -1) > 0.5
        return q, k, v, mask

    def _gather_heads(self, out: torch.Tensor, num_img: int) -> torch.Tensor:
        """Ulysses inverse: ``[B, U·S, h, D]`` → ``[B, S, H, D]`` (sequence slice j goes back to rank j)."""
        size = self.ulysses_size
        batch, _, heads, head_dim = out.shape
        send = out.reshape(batch, size, num_img, heads, head_dim).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        comm.all_to_all_single(recv, send, self.ulysses_group)
        # recv[j] = my tokens for head group j
        return recv.permute(1, 2, 0, 3, 4).reshape(batch, num_img, size * heads, head_dim)

    def _ring(self, q, k, v, mask, tq, tk, tv, txt_mask):
        """Ring attention over the ring group; returns ``(img_out [B, S', h, D], txt_out [B, L, h, D])``."""
        size, rank = self.ring_size, self.ring_rank
        num_elems = k.numel()
        dtype = q.dtype
        current = torch.cat([k.reshape(-1), v.reshape(-1), mask.to(dtype).reshape(-1)])
        spare = torch.empty_like(current)

        def unpack(buffer: torch.Tensor):
            return (
                buffer[:num_elems].view_as(k),
                buffer[num_elems : 2 * num_elems].view_as(v),
                buffer[2 * num_elems :].view_as(mask) > 0.5,
            )

        img_out = img_lse = None
        txt_partial = None
        for step in range(size):
            requests = []
            if step < size - 1:
                # Post the next transfer first so it overlaps this block's compute.
                requests = comm.send_recv(current, (rank + 1) % size, spare, (rank - 1) % size, self.ring_group)
            block_k, block_v, block_mask = unpack(current)
            if step == 0:
                # Image queries: own block plus the text keys (counted here, once).
                out, lse = attention_with_lse(
                    q,
                    torch.cat([block_k, tk], dim=1),
                    torch.cat([block_v, tv], dim=1),
                    torch.cat([block_mask, txt_mask], dim=1),
                    kernel=self.kernel,
                )
                # Text queries: own image block, plus the text keys on ring rank 0 only.
                if rank == 0:
                    tkeys, tvals = torch.cat([block_k, tk], dim=1), torch.cat([block_v, tv], dim=1)
                    tmask = torch.cat([block_mask, txt_mask], dim=1)
                else:
                    tkeys, tvals, tmask = block_k, block_v, block_mask
                txt_partial = attention_with_lse(tq, tkeys, tvals, tmask, kernel=self.kernel)
            else:
                out, lse = attention_with_lse(q, block_k, block_v, block_mask, kernel=self.kernel)
            img_out, img_lse = merge_partials(img_out, img_lse, out, lse)
            for request in requests:
                request.wait()
            if requests:
                current, spare = spare, current
        txt_out = self._merge_text(*txt_partial)
        return img_out.to(dtype), txt_out.to(dtype)

    def _merge_text(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """All-gather the text queries' partial ``(out, lse)`` over the ring and merge them in ring-rank order."""
        packed = torch.cat([out.float().reshape(-1), lse.float().reshape(-1)])
        merged_out = merged_lse = None
        for part in comm.all_gather(packed, self.ring_group):
            part_out = part[: out.numel()].view(out.shape)
            part_lse = part[out.numel() :].view(lse.shape)
            merged_out, merged_lse = merge_partials(merged_out, merged_lse, part_out, part_lse)
        return merged_out


def _img_mask(img_key_mask: torch.Tensor | None, batch: int, num_img: int, device) -> torch.Tensor:
    """``[S]`` or ``[B, S]`` bool (or None = all True) → ``[B, S]`` bool."""
    if img_key_mask is None:
        return torch.ones(batch, num_img, dtype=torch.bool, device=device)
    return img_key_mask.to(torch.bool).expand(batch, num_img)


def build_sequence(
    backend: str = "native",
    kernel: str = "sdpa",
    ring_group=None,
    ulysses_group=None,
    data_degree: int = 1,
    cfg_degree: int = 1,
):
    """The model's sequence boundary: ``LocalSequence`` when both groups have size 1, else our
    ``DistributedSequence`` (``backend=native``) or the optional xfuser adapter (``backend=xfuser``, which checks
    its requirements even for one rank so a bad choice fails early). Call on every rank (xfuser builds groups)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention.backend={backend!r} is not one of {BACKENDS}")
    num_sequence_ranks = comm.group_size(ring_group) * comm.group_size(ulysses_group)
    if backend == "xfuser":
        from avatar.parallel.xfuser import XfuserSequence, require_xfuser

        require_xfuser()
        if num_sequence_ranks > 1:
            return XfuserSequence(ring_group, ulysses_group, kernel, data_degree=data_degree, cfg_degree=cfg_degree)
    if num_sequence_ranks == 1:
        return LocalSequence(kernel=kernel)
    return DistributedSequence(ring_group=ring_group, ulysses_group=ulysses_group, kernel=kernel)
