"""The HunyuanVideo-Avatar DiT (``HYVideoDiffusionTransformer`` of the official release) in the official key layout.

One file holds the whole network (dossier §3): embedders, the text token refiner, 20 double-stream and 40
single-stream blocks (at the official size), the per-frame audio adapters and the final layer. Every width and depth
comes from ``ModelConfig``. The model never imports ``torch.distributed``: sequence parallelism happens at the
boundaries of a ``seq`` object (``avatar/parallel/base.py``).

Shapes: B batch, C latent channels, T latent frames, h/w latent size, F = (h/2)(w/2) tokens per frame,
S image tokens ((T+1)·F, reference frame first; local shard under SP), L text tokens, D hidden size,
H heads, Dh head dim, A audio tokens per video frame.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from avatar.attention import attention
from avatar.config import FPS, OFFICIAL_MOTION_EXP, OFFICIAL_MOTION_POSE, ModelConfig
from avatar.parallel.base import JointLengths, LocalSequence, frame_runs

#: Motion scalars embedded per sample (each to hidden_size // 4, concatenated to hidden_size).
NUM_MOTION_SCALARS = 4
#: Video frames per latent frame that the adapters group audio tokens by; frame 0 is padded this many times minus one.
AUDIO_FRAMES_PER_LATENT = 4
#: Frame rate fed to fps_proj (the one frame rate, ``avatar.config.FPS``).
DEFAULT_FPS = float(FPS)
NORM_EPS = 1e-6


#: Token-grid shapes whose tables a model keeps (least recently used dropped first): a run sees one or two window
#: shapes, a server a few resolutions.
SHAPE_CACHE_SIZE = 4


def _speaker_inputs(audio_feats: torch.Tensor, face_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the speaker axes: ``audio_feats`` ``[B, N, window, layers, channels]`` (one speaker) or ``[B, N, S,
    window, layers, channels]`` (S speakers), ``face_mask`` ``[B, S, T_mask, h, w]`` (one mask per speaker). One
    speaker given with the speaker axis comes back without it (the single-speaker path)."""
    if audio_feats.dim() not in (5, 6):
        raise ValueError(
            f"audio_feats must be [B, N, window, layers, channels] or [B, N, S, ...], got {tuple(audio_feats.shape)}"
        )
    num_speakers = audio_feats.shape[2] if audio_feats.dim() == 6 else 1
    if face_mask.dim() != 5 or face_mask.shape[1] != num_speakers:
        raise ValueError(
            f"face_mask {tuple(face_mask.shape)} must be [B, S, T, h, w] with one mask per speaker (S={num_speakers})"
        )
    if audio_feats.dim() == 6 and num_speakers == 1:
        audio_feats = audio_feats[:, :, 0]
    return audio_feats, face_mask


@dataclass
class CachedInput:
    """Input of the last single block, this rank's part in the frame-sliced layout (``avatar/parallel/base.py``):
    img ``[B, T+1, F_local, D]`` (frame 0 = the reference frame, F_local = ceil(F / W) tokens of every frame),
    txt ``[B, L, D]``."""

    img: torch.Tensor
    txt: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` in fp32, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gate(x: torch.Tensor, gate_values: torch.Tensor) -> torch.Tensor:
    return x * gate_values.unsqueeze(1)


def rope_table(
    cfg: ModelConfig, num_frames: int, height: int, width: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``(cos, sin)``, each ``[(num_frames+1)·height·width, head_dim]`` fp32 on ``device`` (default CPU), for a
    token grid of ``num_frames`` video frames preceded by the reference frame at t = −1 (``height``/``width`` in
    tokens).

    Per axis (t, h, w) with ``dim`` = cfg.rope_axes[i]: angle = pos · θ^(−2k/dim), k < dim/2, each angle repeated
    twice (interleaved pairs); the three axes are concatenated."""
    positions = (
        torch.arange(-1, num_frames, dtype=torch.float32, device=device),
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
    )
    grid = torch.meshgrid(*positions, indexing="ij")
    cos_parts, sin_parts = [], []
    for axis_dim, axis_pos in zip(cfg.rope_axes, grid):
        inv_freq = 1.0 / (
            cfg.rope_theta
            ** (torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device)[: axis_dim // 2] / axis_dim)
        )
        angles = torch.outer(axis_pos.reshape(-1), inv_freq)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) adjacent pairs -> (−b, a)."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-imag, real], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, Dh]`` by tables ``[S, Dh]`` in fp32; returns x's dtype."""
    xf = x.float()
    out = xf * cos[None, :, None, :] + rotate_pairs(xf) * sin[None, :, None, :]
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, normalised in fp32 then cast back, affine weight applied after."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch; ``[B, C, T, h, w]`` -> ``[B, T·(h/ph)·(w/pw), D]``."""

    def __init__(self, patch: list[int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=tuple(patch), stride=tuple(patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class MLPEmbedder(nn.Module):
    """``vector_in``: Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x.to(self.in_layer.weight.dtype))))


class TextProjection(nn.Module):
    """``c_embedder``: Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class Modulation(nn.Module):
    """SiLU -> Linear to ``factor`` chunks of width D (key ``linear``)."""

    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, factor * dim)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(vec))


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, S, 3·H·Dh]`` -> q, k, v each ``[B, S, H, Dh]``."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)
    return q, k, v


def token_chunks(num_tokens: int, chunk: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``chunk`` tokens covering ``num_tokens`` (one range when ``chunk`` is
    None). Per-token layers (norms, linears, MLPs) run range by range to bound their activations; each token's
    values are those of the whole-sequence call."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"token chunk must be a positive token count or None, got {chunk}")
    step = num_tokens if chunk is None else chunk
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, max(step, 1))]


def linear_rows(linear: nn.Module, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
    """Output features ``[start, stop)`` of ``linear`` on ``x``: the same products as ``linear(x)[..., start:stop]``
    without computing the rest. A layer with its own ``forward_rows`` (the fp8 linear) dequantises those rows only."""
    forward_rows = getattr(linear, "forward_rows", None)
    if forward_rows is not None:
        return forward_rows(x, start, stop)
    bias = None if linear.bias is None else linear.bias[start:stop]
    return F.linear(x, linear.weight[start:stop], bias)


def map_tokens(fn, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``fn(x)`` for a per-token ``fn`` on ``x`` ``[B, S, ...]``, computed ``chunk`` tokens at a time into one
    output: only one chunk's intermediates are alive at once."""
    ranges = token_chunks(x.shape[1], chunk)
    if len(ranges) <= 1:
        return fn(x)
    out = None
    for start, stop in ranges:
        part = fn(x[:, start:stop].contiguous())  # contiguous: the kernels of the whole-sequence call
        if out is None:
            out = part.new_empty((part.shape[0], x.shape[1], *part.shape[2:]))
        out[:, start:stop] = part
        del part
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Text token refiner (txt_in)
# ----------------------------------------------------------------------------------------------------------------------


class RefinerBlock(nn.Module):
    """Self-attention + SiLU MLP, both gated by ``adaLN_modulation(c)`` (gate_msa, gate_mlp); no qk-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = MLP(dim, mlp_hidden, nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, segments: list[RefinerSegment]) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)
        q, k, v = split_heads(self.self_attn_qkv(self.norm1(x)), self.num_heads)
        attn = refiner_attention(q, k, v, segments)
        x = x + gate(self.self_attn_proj(attn.flatten(2)), gate_msa)
        x = x + gate(self.mlp(self.norm2(x)), gate_mlp)
        return x


class IndividualTokenRefiner(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([RefinerBlock(dim, num_heads, mlp_hidden) for _ in range(depth)])

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, segments: list[RefinerSegment] | None = None
    ) -> torch.Tensor:
        segments = refiner_segments(mask) if segments is None else segments
        for block in self.blocks:
            x = block(x, c, segments)
        return x


def refiner_pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """The official positional mask ``[B, 1, L, L]``: query i may see key j iff mask_i and mask_j, and every query
    may see key 0."""
    keep = mask.bool()
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    pair[..., 0] = True
    return pair


@dataclass(frozen=True)
class RefinerSegment:
    """The refiner's positional mask (:func:`refiner_pair_mask`) for some batch ``rows`` as index sets: the
    ``queries`` (mask 1) attend to ``keys`` (mask 1, plus position 0); every other position sees key 0 only, so its
    output is v of position 0. None: every position (a full, unmasked attention)."""

    rows: slice
    queries: torch.Tensor | None
    keys: torch.Tensor | None
    others: torch.Tensor | None


def refiner_segments(mask: torch.Tensor) -> list[RefinerSegment]:
    """The host-known index sets of ``mask`` ``[B, L]`` (one host read of the small mask): one segment when every
    row has the same mask, else one per row."""
    keep = mask.bool().tolist()
    groups = (
        [(slice(None), keep[0])]
        if all(row == keep[0] for row in keep)
        else [(slice(b, b + 1), row) for b, row in enumerate(keep)]
    )
    segments = []
    for rows, row in groups:
        if all(row):
            segments.append(RefinerSegment(rows, None, None, None))
            continue
        queries = [i for i, on in enumerate(row) if on]
        keys = sorted({0, *queries})
        others = [i for i, on in enumerate(row) if not on]

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=mask.device)

        segments.append(RefinerSegment(rows, index(queries), index(keys), index(others)))
    return segments


def refiner_attention(q, k, v, segments: list[RefinerSegment]) -> torch.Tensor:
    """The refiner's masked self-attention without a mask: q/k/v ``[B, L, H, Dh]`` → ``[B, L, H, Dh]``."""
    if len(segments) == 1 and segments[0].queries is None:
        return attention(q, k, v)
    out = torch.empty_like(q)
    for seg in segments:
        if seg.queries is None:
            out[seg.rows] = attention(q[seg.rows], k[seg.rows], v[seg.rows])
            continue
        rows_q, rows_k, rows_v = q[seg.rows], k[seg.rows], v[seg.rows]
        part = out[seg.rows]
        if seg.queries.numel():
            part[:, seg.queries] = attention(
                rows_q.index_select(1, seg.queries), rows_k.index_select(1, seg.keys), rows_v.index_select(1, seg.keys)
            )
        part[:, seg.others] = rows_v[:, :1].expand(-1, seg.others.numel(), -1, -1)  # part is a view of out
    return out


class SingleTokenRefiner(nn.Module):
    """``txt_in``: mean-pool the raw states over the mask, condition on t + pool, embed, refine."""

    def __init__(self, in_dim: int, dim: int, num_heads: int, mlp_hidden: int, depth: int, freq_dim: int) -> None:
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, dim)
        self.t_embedder = TimestepEmbedder(dim, freq_dim)
        self.c_embedder = TextProjection(in_dim, dim)
        self.individual_token_refiner = IndividualTokenRefiner(dim, num_heads, mlp_hidden, depth)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, segments: list[RefinerSegment] | None = None
    ) -> torch.Tensor:
        """``segments``: ``refiner_segments(mask)`` when the caller has them (they need a host read of the mask)."""
        dtype = self.input_embedder.weight.dtype
        mask_float = mask.float().unsqueeze(-1)
        pooled = (x.float() * mask_float).sum(dim=1) / mask_float.sum(dim=1)
        c = self.t_embedder(t) + self.c_embedder(pooled.to(dtype))
        x = self.input_embedder(x.to(dtype))
        return self.individual_token_refiner(x, c, mask, segments)


# ----------------------------------------------------------------------------------------------------------------------
# Audio: projection and per-frame adapters
# ----------------------------------------------------------------------------------------------------------------------


class AudioProjNet(nn.Module):
    """``audio_proj``: each video frame's (window × layers × channels) Whisper features -> A tokens of width D."""

    def __init__(self, in_dim: int, inner_dim: int, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj1 = nn.Linear(in_dim, inner_dim)
        self.proj2 = nn.Linear(inner_dim, inner_dim)
        self.proj3 = nn.Linear(inner_dim, num_tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, N, window, layers, channels]`` -> ``[B, N, A, D]``."""
        x = audio.flatten(2).to(self.proj1.weight.dtype)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        tokens = self.proj3(x).unflatten(-1, (self.num_tokens, -1))
        return self.norm(tokens)


class AudioAdapter(nn.Module):
    """Single-head cross-attention per latent frame: video tokens (queries) attend to that frame's audio tokens."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.inner_dim = inner_dim
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, audio: torch.Tensor | list[torch.Tensor], video: torch.Tensor):
        """audio ``[B, n, 4A, D]``, video ``[B, n, F, D]`` -> ``[B, n, F, D]`` (n frames, no mixing across them).

        Several speakers: ``audio`` a list of such tensors, one per speaker -> a list of outputs, each what the call
        with that speaker's audio alone returns; the queries are computed once."""
        if isinstance(audio, (list, tuple)):
            q = self.to_q(self.norm2(video))
            return [self._attend(q, speaker) for speaker in audio]
        audio = self.norm1(audio)
        video = self.norm2(video)
        q = self.to_q(video)
        k, v = self.to_kv(audio).chunk(2, dim=-1)
        scale = 1 / math.sqrt(math.sqrt(self.inner_dim))  # dh^-1/4 on q and on k
        weights = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        return self.to_out(weights @ v)

    def _attend(self, q: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The single-speaker forward's ops after ``to_q``, for one speaker's audio."""
        k, v = self.to_kv(self.norm1(audio)).chunk(2, dim=-1)
        scale = 1 / math.sqrt(math.sqrt(self.inner_dim))
        weights = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        return self.to_out(weights @ v)


# ----------------------------------------------------------------------------------------------------------------------
# DiT blocks
# ----------------------------------------------------------------------------------------------------------------------


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: separate image and text weights, joint attention over [img; txt]."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.img_mod = Modulation(dim, 6)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_attn_qkv = nn.Linear(dim, 3 * dim)
        self.img_attn_q_norm = RMSNorm(head_dim)
        self.img_attn_k_norm = RMSNorm(head_dim)
        self.img_attn_proj = nn.Linear(dim, dim)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_mlp = MLP(dim, mlp_hidden, nn.GELU(approximate="tanh"))
        self.txt_mod = Modulation(dim, 6)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_attn_qkv = nn.Linear(dim, 3 * dim)
        self.txt_attn_q_norm = RMSNorm(head_dim)
        self.txt_attn_k_norm = RMSNorm(head_dim)
        self.txt_attn_proj = nn.Linear(dim, dim)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_mlp = MLP(dim, mlp_hidden, nn.GELU(approximate="tanh"))
        self.token_chunk: int | None = None
        """Image tokens per chunk of the MLP half (None: all at once); set by ``AvatarDiT.set_token_chunk``."""

    def forward(self, img, txt, vec, rope_cos, rope_sin, seq, lengths: JointLengths):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec).chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec).chunk(6, dim=-1)

        img_q, img_k, img_v = self._img_qkv(img, img_shift1, img_scale1, rope_cos, rope_sin)

        txt_q, txt_k, txt_v = split_heads(
            self.txt_attn_qkv(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1)), self.num_heads
        )
        txt_q = self.txt_attn_q_norm(txt_q).to(txt_v.dtype)
        txt_k = self.txt_attn_k_norm(txt_k).to(txt_v.dtype)

        img_attn, txt_attn = seq.joint_attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, lengths)

        img = img + gate(self.img_attn_proj(img_attn.flatten(2)), img_gate1)
        del img_attn, img_q, img_k, img_v
        img = map_tokens(
            lambda rows: rows + gate(self.img_mlp(modulate(self.img_norm2(rows), img_shift2, img_scale2)), img_gate2),
            img,
            self.token_chunk,
        )
        txt = txt + gate(self.txt_attn_proj(txt_attn.flatten(2)), txt_gate1)
        txt = txt + gate(self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2)), txt_gate2)
        return img, txt

    def _img_qkv(self, img, shift, scale, rope_cos, rope_sin):
        """Image q, k (normed, rotated) and v ``[B, S, H, Dh]``, ``token_chunk`` tokens at a time into three buffers:
        the ``[S, 3D]`` projection and the fp32 norm/RoPE temporaries exist for one chunk only (all per token, so
        every value is that of the whole-sequence call)."""
        ranges = token_chunks(img.shape[1], self.token_chunk)
        q = k = v = None
        for start, stop in ranges:
            rows = modulate(self.img_norm1(img[:, start:stop].contiguous()), shift, scale)
            part_q, part_k, part_v = split_heads(self.img_attn_qkv(rows), self.num_heads)
            del rows
            cos, sin = rope_cos[start:stop], rope_sin[start:stop]
            part_q = apply_rope(self.img_attn_q_norm(part_q).to(part_v.dtype), cos, sin)
            part_k = apply_rope(self.img_attn_k_norm(part_k).to(part_v.dtype), cos, sin)
            if len(ranges) == 1:
                return part_q, part_k, part_v
            if q is None:  # (no generator: see SingleStreamBlock.forward)
                shape = (img.shape[0], img.shape[1], *part_v.shape[2:])
                q, k, v = part_v.new_empty(shape), part_v.new_empty(shape), part_v.new_empty(shape)
            for buffer, part in zip((q, k, v), (part_q, part_k, part_v)):
                buffer[:, start:stop] = part
            del part_q, part_k, part_v, part
        return q, k, v


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on x = [img; txt] with shared weights (linear1 = [q, k, v | mlp_in])."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, 3)
        self.token_chunk: int | None = None
        """Tokens per chunk of ``linear1``/MLP/``linear2`` (None: all at once); set by ``AvatarDiT.set_token_chunk``."""

    def forward(self, x, vec, num_txt, rope_cos, rope_sin, seq, lengths: JointLengths):
        shift, scale, gate_values = self.modulation(vec).chunk(3, dim=-1)
        # linear1 in token chunks and in two halves by output features (the same dot products as the whole layer):
        # first q, k, v into three buffers (so the raw q and k die at their norms), then, after the attention, the
        # MLP half chunk by chunk straight into linear2. The [S, 3D + mlp_hidden] output, its GELU and their concat
        # never exist at full length, and nothing of the attention but its output is alive in the MLP half.
        # The q/k norms and the RoPE of the image tokens run per chunk as well (per token: the same values).
        ranges = token_chunks(x.shape[1], self.token_chunk)
        num_img = x.shape[1] - num_txt
        q = k = v = None
        for start, stop in ranges:
            part = linear_rows(self.linear1, self._modulated(x, start, stop, shift, scale), 0, 3 * self.dim)
            part_q, part_k, part_v = part.chunk(3, dim=-1)
            del part
            heads = (self.num_heads, -1)
            part_q = self.q_norm(part_q.unflatten(-1, heads)).to(part_v.dtype)
            part_k = self.k_norm(part_k.unflatten(-1, heads)).to(part_v.dtype)
            part_v = part_v.unflatten(-1, heads)
            rotated = max(0, min(stop, num_img) - start)  # image tokens of this chunk (text tokens get no RoPE)
            if rotated:
                cos, sin = rope_cos[start : start + rotated], rope_sin[start : start + rotated]
                part_q = torch.cat([apply_rope(part_q[:, :rotated], cos, sin), part_q[:, rotated:]], dim=1)
                part_k = torch.cat([apply_rope(part_k[:, :rotated], cos, sin), part_k[:, rotated:]], dim=1)
            # (no generator here: it would make ``part_v`` a closure cell, which torch.compile cannot del)
            if q is None:
                shape = (x.shape[0], x.shape[1], *part_v.shape[2:])
                q, k, v = part_v.new_empty(shape), part_v.new_empty(shape), part_v.new_empty(shape)
            for buffer, rows in zip((q, k, v), (part_q, part_k, part_v)):
                buffer[:, start:stop] = rows
            del part_q, part_k, part_v, rows
        img_attn, txt_attn = seq.joint_attention(
            q[:, :num_img], k[:, :num_img], v[:, :num_img], q[:, num_img:], k[:, num_img:], v[:, num_img:], lengths
        )
        attn = torch.cat([img_attn, txt_attn], dim=1).flatten(2)
        del q, k, v, img_attn, txt_attn
        out = None
        for start, stop in ranges:
            hidden = self.mlp_act(
                linear_rows(self.linear1, self._modulated(x, start, stop, shift, scale), 3 * self.dim, None)
            )
            part = x[:, start:stop] + gate(self.linear2(torch.cat([attn[:, start:stop], hidden], dim=-1)), gate_values)
            del hidden
            if out is None:
                out = part.new_empty((x.shape[0], x.shape[1], *part.shape[2:]))
            out[:, start:stop] = part
            del part
        return out

    def _modulated(self, x, start, stop, shift, scale):
        """The modulated pre-norm of tokens ``[start, stop)`` (contiguous: the kernels of the whole-sequence call)."""
        return modulate(self.pre_norm(x[:, start:stop].contiguous()), shift, scale)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by (shift, scale), then linear to one patch of latents per token."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x.to(self.linear.weight.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


class AvatarDiT(nn.Module):
    """HunyuanVideo-Avatar DiT; ``state_dict()`` keys are the official ones (dossier §3.2)."""

    #: Modules the official builds without its dtype, so they stay fp32 in a bf16 model.
    _keep_in_fp32_modules = ("before_proj", "audio_proj", "audio_adapter_blocks", "final_layer.linear")

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        dim = cfg.hidden_size
        if dim % cfg.num_heads or sum(cfg.rope_axes) != dim // cfg.num_heads:
            raise ValueError(
                f"hidden_size {dim} / num_heads {cfg.num_heads} must give head_dim = sum(rope_axes) {cfg.rope_axes}"
            )
        if cfg.depth_single < 1:
            raise ValueError(
                f"depth_single must be >= 1 (the last single block is the cache point), got {cfg.depth_single}"
            )
        if dim % NUM_MOTION_SCALARS:
            raise ValueError(f"hidden_size {dim} must be divisible by {NUM_MOTION_SCALARS} (motion embedders)")
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        mlp_hidden = int(dim * cfg.mlp_ratio)
        patch_volume = math.prod(cfg.patch_size)

        with torch.device(device) if device is not None else contextlib.nullcontext():
            # 1. Patch embedders: the noisy latents, and the reference latents (ref_in -> before_proj is added).
            self.img_in = PatchEmbed(cfg.patch_size, cfg.latent_channels, dim)
            self.ref_in = PatchEmbed(cfg.patch_size, cfg.latent_channels, dim)
            self.before_proj = nn.Linear(dim, dim)
            # 2. Text: token refiner over the LLaVA states; CLIP pooled vector into the modulation vector.
            self.txt_in = SingleTokenRefiner(
                cfg.text_states_dim, dim, cfg.num_heads, mlp_hidden, cfg.refiner_depth, cfg.time_embed_dim
            )
            self.vector_in = MLPEmbedder(cfg.text_states_dim_2, dim)
            # 3. Modulation-vector embedders: timestep, motion buckets (4 scalars × D/4), fps.
            self.time_in = TimestepEmbedder(dim, cfg.time_embed_dim)
            self.motion_exp = TimestepEmbedder(dim // NUM_MOTION_SCALARS, cfg.time_embed_dim)
            self.motion_pose = TimestepEmbedder(dim // NUM_MOTION_SCALARS, cfg.time_embed_dim)
            self.fps_proj = TimestepEmbedder(dim, cfg.time_embed_dim)
            # 4. Audio: Whisper windows -> audio tokens; single-head adapters after selected double blocks.
            audio_in = cfg.audio_window * cfg.audio_layers * cfg.audio_channels
            self.audio_proj = AudioProjNet(audio_in, cfg.audio_proj_dim, cfg.audio_tokens, dim)
            self.audio_adapter_blocks = nn.ModuleList(
                [AudioAdapter(dim, cfg.adapter_dim) for _ in cfg.adapter_after_double]
            )
            # 5. Transformer blocks.
            self.double_blocks = nn.ModuleList(
                [DoubleStreamBlock(dim, cfg.num_heads, mlp_hidden) for _ in range(cfg.depth_double)]
            )
            self.single_blocks = nn.ModuleList(
                [SingleStreamBlock(dim, cfg.num_heads, mlp_hidden) for _ in range(cfg.depth_single)]
            )
            # 6. Output.
            self.final_layer = FinalLayer(dim, patch_volume * cfg.latent_channels)

        # Adapters after positions beyond the double depth are built (their keys load) but never run, as in the
        # official constructor, which builds all of them and runs those whose double block exists.
        self.adapter_index = {block: j for j, block in enumerate(cfg.adapter_after_double) if block < cfg.depth_double}
        if any(b < 0 for b in cfg.adapter_after_double):
            raise ValueError(f"adapter_after_double {cfg.adapter_after_double} must be double-block indices >= 0")
        self.seq = LocalSequence()
        self._tables: OrderedDict[tuple, tuple] = OrderedDict()
        self.num_table_builds = 0
        """How many times the shape tables were built (once per new shape; tests and the bench read it)."""
        if dtype is not None:
            self.to_dtype(dtype)

    # --- setup ---------------------------------------------------------------------------------------------------

    def to_dtype(self, dtype: torch.dtype) -> AvatarDiT:
        """Cast to ``dtype``, keeping the official fp32 modules in fp32. Call before any fp8 conversion (``.to``
        would cast float8 weights too)."""
        self.to(dtype)
        for name in self._keep_in_fp32_modules:
            self.get_submodule(name).to(torch.float32)
        return self

    def set_token_chunk(self, chunk: int | None) -> None:
        """Run the per-token layers of every block (single blocks' linear1/MLP/linear2, double blocks' image MLP)
        ``chunk`` tokens at a time (None: the whole local sequence at once). Outputs do not depend on it."""
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"token chunk must be a positive token count or None, got {chunk!r}")
        for block in [*self.double_blocks, *self.single_blocks]:
            block.token_chunk = chunk

    def block_sequence(self) -> list[nn.Module]:
        """The large submodules in the order a full forward runs them, each once: ``txt_in``, every double block
        (followed by its audio adapter where one runs), every single block. A cached forward runs only the last.
        Weight sharding and block offload move the weights unit by unit in this order (``avatar/parallel/fsdp.py``,
        ``avatar/memory/offload.py``); everything else is small and stays resident."""
        units: list[nn.Module] = [self.txt_in]
        for index, block in enumerate(self.double_blocks):
            units.append(block)
            if index in self.adapter_index:
                units.append(self.audio_adapter_blocks[self.adapter_index[index]])
        units.extend(self.single_blocks)
        return units

    def set_sequence_parallel(self, seq) -> None:
        """Use ``seq`` (``avatar/parallel/base.py`` interface) at the sequence boundaries."""
        self.seq = seq
        self._tables.clear()

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.proj.weight.dtype

    # --- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        ref_latents: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        text_states_2: torch.Tensor,
        audio_feats: torch.Tensor,
        face_mask: torch.Tensor,
        motion_exp: torch.Tensor | None = None,
        motion_pose: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        cache: str | None = None,
        cached: CachedInput | None = None,
    ):
        """Velocity ``[B, C, T, h, w]`` (with ``cache="store"``: ``(velocity, CachedInput)``). The velocity is in
        ``final_layer.linear``'s dtype (fp32, as the official keeps that layer in fp32)."""
        cfg, seq = self.cfg, self.seq
        batch, _, num_frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if pt != 1:
            raise ValueError(f"patch_size[0] must be 1 (one token frame per latent frame), got {cfg.patch_size}")
        grid_h, grid_w = height // ph, width // pw
        num_seq_frames = num_frames + 1  # the reference frame first
        num_txt = text_states.shape[1]
        dtype = self.dtype
        if cache not in (None, "store", "reuse"):
            raise ValueError(f"cache must be None, 'store' or 'reuse', got {cache!r}")

        # 1. Modulation vector.
        vec = self.time_in(t)
        vec = vec + self._motion(self.motion_exp, motion_exp, OFFICIAL_MOTION_EXP, batch, x.device)
        vec = vec + self._motion(self.motion_pose, motion_pose, OFFICIAL_MOTION_POSE, batch, x.device)
        fps = torch.full((batch,), DEFAULT_FPS, device=x.device) if fps is None else fps
        vec = vec + self.fps_proj(fps)
        vec = vec + self.vector_in(text_states_2)

        # Positions (this rank's contiguous slice of the token sequence) and the host-known attention lengths.
        tokens_per_frame = grid_h * grid_w
        num_img = num_seq_frames * tokens_per_frame

        def build_tables():  # shape-only: built once per shape, device and sequence rank (``_shape_tables``)
            cos, sin = rope_table(cfg, num_frames, grid_h, grid_w, device=x.device)
            return seq.shard_tokens(cos, dim=0), seq.shard_tokens(sin, dim=0)

        rope_cos, rope_sin = self._shape_tables((num_frames, grid_h, grid_w), x.device, build_tables)
        text_counts, refiner_index = self._text_layout(text_mask)
        lengths = JointLengths(num_img=num_img, num_txt=text_counts)

        if cache == "reuse":
            if cached is None:
                raise ValueError("cache='reuse' needs the CachedInput of an earlier cache='store' call")
            x_seq = torch.cat([seq.from_frame_slices(cached.img, tokens_per_frame), cached.txt], dim=1)
        else:
            # 2. Audio tokens, grouped per latent frame: [B, 4T-3, A, D] -> [B, T, 4A, D]. Several speakers
            # (audio_feats [B, 4T-3, S, ...], face_mask [B, S, ...]): one token set per speaker; one speaker given
            # that way takes the single-speaker path below, op for op.
            expected_audio = AUDIO_FRAMES_PER_LATENT * (num_frames - 1) + 1
            if audio_feats.shape[1] != expected_audio:
                raise ValueError(
                    f"audio_feats has {audio_feats.shape[1]} frames, expected {expected_audio} for {num_frames} latent frames"
                )
            audio_feats, face_mask = _speaker_inputs(audio_feats, face_mask)
            speakers = None
            if audio_feats.dim() == 6:  # two or more speakers
                speakers = [
                    self._audio_tokens(audio_feats[:, :, i], batch, num_frames) for i in range(audio_feats.shape[2])
                ]
                audio = speakers[0]
            else:
                audio = self._audio_tokens(audio_feats, batch, num_frames)

            # 3. Image tokens: noisy latents + reference (ref_in -> before_proj), reference first frame prepended.
            img = self.img_in(x.to(dtype))
            ref = self.before_proj(self.ref_in(ref_latents.to(dtype)).to(self.before_proj.weight.dtype))
            img = img + ref.to(img.dtype)
            del ref
            ref_first = self.img_in(ref_latents[:, :, :1].to(dtype))
            img = torch.cat([ref_first, img], dim=1)
            img = seq.shard_tokens(img)

            # 4. Text tokens.
            txt = self.txt_in(text_states, t, text_mask, refiner_index)

            # 5. Face mask per token (zero on the reference frame); audio tokens per sequence frame (zero on the
            # reference frame, whose adapter output the mask zeroes anyway).
            # Several speakers: one token mask and one audio per speaker (the masks are disjoint).
            if speakers is None:
                token_face_mask = self._token_face_mask(face_mask, num_frames, grid_h, grid_w)
                token_face_mask = seq.shard_tokens(token_face_mask).unsqueeze(-1)
                frame_audio = torch.cat([torch.zeros_like(audio[:, :1]), audio], dim=1)
            else:
                token_face_mask = [
                    seq.shard_tokens(
                        self._token_face_mask(face_mask[:, i : i + 1], num_frames, grid_h, grid_w)
                    ).unsqueeze(-1)
                    for i in range(len(speakers))
                ]
                frame_audio = [torch.cat([torch.zeros_like(a[:, :1]), a], dim=1) for a in speakers]
                del speakers

            # 6. Double blocks, each followed by its audio adapter where configured.
            for index, block in enumerate(self.double_blocks):
                img, txt = block(img, txt, vec, rope_cos, rope_sin, seq, lengths)
                if index in self.adapter_index:
                    adapter = self.audio_adapter_blocks[self.adapter_index[index]]
                    token_range = seq.token_range(num_img)
                    out = self._audio_adapter(adapter, img, frame_audio, token_range, tokens_per_frame)
                    if isinstance(out, list):
                        # img += Σ_i m_i ⊙ Adapter(a_i, img): every speaker's adapter sees the same img.
                        total = out[0] * token_face_mask[0]
                        for part, speaker_mask in zip(out[1:], token_face_mask[1:]):
                            total = total + part * speaker_mask
                        out = total
                        del total
                        img = img + out.to(img.dtype)
                    else:
                        img = img + (out * token_face_mask).to(img.dtype)
                    del out

            # 7. Single blocks on [img; txt], all but the last (the cache point).
            x_seq = torch.cat([img, txt], dim=1)
            del img, txt, audio, frame_audio, token_face_mask
            for block in self.single_blocks[:-1]:
                x_seq = block(x_seq, vec, num_txt, rope_cos, rope_sin, seq, lengths)

        stored = None
        if cache == "store":
            img_rows = seq.to_frame_slices(x_seq[:, :-num_txt], num_seq_frames, tokens_per_frame)
            stored = CachedInput(img=img_rows, txt=x_seq[:, -num_txt:])
        x_seq = self.single_blocks[-1](x_seq, vec, num_txt, rope_cos, rope_sin, seq, lengths)

        # 8. Output: final layer on the local image tokens, gather, drop the reference frame, unpatchify.
        out = self.final_layer(x_seq[:, :-num_txt], vec)
        del x_seq
        out = seq.gather_tokens(out, num_img)[:, tokens_per_frame:]
        velocity = self._unpatchify(out, num_frames, grid_h, grid_w)
        return (velocity, stored) if cache == "store" else velocity

    # --- forward helpers -----------------------------------------------------------------------------------------

    def _text_layout(self, text_mask: torch.Tensor) -> tuple[tuple[int, ...], list[RefinerSegment]]:
        """``(valid text tokens per batch row, refiner_segments(text_mask))``: the count is ``sum(mask)``, the official
        ``cu_seqlens`` count. Read to the host once per mask tensor (the pipeline passes the same few masks every step;
        a mask changed in place is read again)."""
        if text_mask.device.type == "meta" or is_fake(text_mask):
            # No values to read (the memory model's fake forward): every text token valid, the largest layout.
            batch, num_txt = text_mask.shape
            return (num_txt,) * batch, [RefinerSegment(slice(None), None, None, None)]
        memo = self.__dict__.setdefault("_text_layout_memo", {})
        key = id(text_mask)
        hit = memo.get(key)
        if hit is not None and hit[0]() is text_mask and hit[1] == text_mask._version:
            return hit[2]
        layout = (tuple(int(n) for n in text_mask.sum(dim=1).tolist()), refiner_segments(text_mask))
        for stale in [k for k, entry in memo.items() if entry[0]() is None]:
            del memo[stale]
        memo[key] = (weakref.ref(text_mask), text_mask._version, layout)
        return layout

    def _audio_adapter(self, adapter, img, frame_audio, token_range, tokens_per_frame):
        """``adapter`` on this rank's image tokens ``[B, S, D]``, each token with its frame's audio tokens
        (``frame_audio`` ``[B, T+1, 4A, D]``): one call per run of whole frames or part of a frame; zero on the
        padding rows. Several speakers (``frame_audio`` a list, one per speaker): a list of outputs, all speakers in
        the same calls."""
        if isinstance(frame_audio, list):
            outputs = [[] for _ in frame_audio]
            for first, count, begin, end in frame_runs(*token_range, tokens_per_frame):
                parts = self._adapter_run(adapter, img, [a[:, first : first + count] for a in frame_audio], begin, end)
                for collected, part in zip(outputs, parts):
                    collected.append(part)
            return [self._adapter_rows(adapter, img, parts, token_range) for parts in outputs]
        parts = [
            self._adapter_run(adapter, img, frame_audio[:, first : first + count], begin, end)
            for first, count, begin, end in frame_runs(*token_range, tokens_per_frame)
        ]
        return self._adapter_rows(adapter, img, parts, token_range)

    @staticmethod
    def _adapter_run(adapter, img, audio, begin: int, end: int):
        """``adapter`` on local image rows ``[begin, end)`` (whole frames, or part of one frame) with their frames'
        audio tokens (a tensor, or one per speaker) -> ``[B, end − begin, D]`` (or one per speaker)."""
        dtype = adapter.to_q.weight.dtype
        count = audio[0].shape[1] if isinstance(audio, list) else audio.shape[1]
        video = img[:, begin:end].to(dtype).unflatten(1, (count, -1))
        if isinstance(audio, list):
            return [out.flatten(1, 2) for out in adapter([a.to(dtype) for a in audio], video)]
        return adapter(audio.to(dtype), video).flatten(1, 2)

    @staticmethod
    def _adapter_rows(adapter, img, parts: list[torch.Tensor], token_range) -> torch.Tensor:
        """The runs' outputs as this rank's rows, zero (in the adapter's dtype) on the padding rows."""
        start, stop = token_range
        if img.shape[1] > stop - start:
            shape = (img.shape[0], img.shape[1] - (stop - start), img.shape[2])
            parts = [*parts, img.new_zeros(shape, dtype=adapter.to_q.weight.dtype)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _audio_tokens(self, audio_feats: torch.Tensor, batch: int, num_frames: int) -> torch.Tensor:
        """One speaker's Whisper features ``[B, 4T-3, window, layers, channels]`` -> audio tokens per latent frame
        ``[B, T, 4A, D]`` (frame 0 padded to 4 video frames)."""
        audio = self.audio_proj(audio_feats)
        audio = torch.cat([audio[:, :1]] * (AUDIO_FRAMES_PER_LATENT - 1) + [audio], dim=1)
        return audio.reshape(batch, num_frames, -1, audio.shape[-1])

    def _shape_tables(self, shape: tuple, device: torch.device, build) -> tuple:
        """``build()`` (tensors that only the token-grid ``shape`` decides: RoPE rows, masks) from the per-shape cache
        of the last ``SHAPE_CACHE_SIZE`` shapes, keyed by shape, device and sequence rank/world."""
        key = (*shape, torch.device(device), self.seq.rank, self.seq.world)
        tables = self._tables.get(key)
        if tables is None:
            tables = self._tables[key] = build()
            self.num_table_builds += 1
            while len(self._tables) > SHAPE_CACHE_SIZE:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return tables

    def _motion(self, embedder, values, default, batch, device) -> torch.Tensor:
        """Embed ``values`` ``[B, 4]`` (default: the config constant) to ``[B, D]``."""
        if values is None:
            values = torch.full((batch, NUM_MOTION_SCALARS), float(default), device=device)
        return embedder(values.reshape(-1)).reshape(batch, -1)

    def _token_face_mask(self, face_mask, num_frames, grid_h, grid_w) -> torch.Tensor:
        """``[B, (T+1)·F]`` float: the face mask nearest-resized to the token grid, zero on the reference frame."""
        mask = F.interpolate(face_mask.float(), size=(num_frames, grid_h, grid_w), mode="nearest").flatten(1)
        return torch.cat([torch.zeros_like(mask[:, : grid_h * grid_w]), mask], dim=1)

    def _unpatchify(self, tokens: torch.Tensor, num_frames: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """``[B, T·gh·gw, C·pt·ph·pw]`` -> ``[B, C, T·pt, gh·ph, gw·pw]``."""
        pt, ph, pw = self.cfg.patch_size
        channels = self.cfg.latent_channels
        x = tokens.reshape(tokens.shape[0], num_frames, grid_h, grid_w, channels, pt, ph, pw)
        x = torch.einsum("nthwcopq->nctohpwq", x)
        return x.reshape(tokens.shape[0], channels, num_frames * pt, grid_h * ph, grid_w * pw)
