"""Optional xfuser (xDiT USP) backend, ``attention.backend=xfuser``: the sequence-parallel interface of
``avatar/parallel/base.py`` with joint attention done by ``xFuserLongContextAttention``.

Nothing else in the project imports xfuser or yunchang; both are imported lazily here. The backend needs CUDA and the
``[xdit]`` extra (xfuser 0.7.0, yunchang 0.6.4). It does not run on a CPU torch (``import xfuser`` needs triton and
an accelerator) and has no padding, so it supports only image token counts divisible by the sequence-parallel world.
Text lengths are host-known (``JointLengths``): it gets exactly the valid text tokens, the padded ones attend in
their own segment. Our own backend, ``attention.backend=native``, has no such limit.

The token-count rule is checked before any model is built: ``xfuser_token_problem`` is a pure function that
``avatar.validate`` calls for every job (the bucketed image size and the window give the count that is sharded, the
image tokens of one window's sequence; the plan gives ring·ulysses); ``XfuserSequence.shard_tokens`` keeps the same
check as a guard for direct library callers.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from avatar.parallel.sequence import DistributedSequence

logger = logging.getLogger(__name__)

#: Sequence-parallel degrees listed as valid alternatives in ``xfuser_token_problem``'s message (at most).
MAX_LISTED_DEGREE = 64


def xfuser_token_problem(num_tokens: int, sequence_degree: int, counted: str = "tokens per frame") -> str | None:
    """Why ``attention.backend=xfuser`` (no padding) cannot shard ``num_tokens`` (``counted``: what they are) over
    ``sequence_degree`` (= ring·ulysses) ranks, in one line naming both and what is valid; None when it can (or with
    no sequence parallelism). Pure: no xfuser import, no process group."""
    if sequence_degree <= 1 or num_tokens % sequence_degree == 0:
        return None
    valid = [d for d in range(1, min(num_tokens, MAX_LISTED_DEGREE) + 1) if num_tokens % d == 0]
    return (
        f"attention.backend=xfuser needs the {counted} ({num_tokens}) divisible by the sequence-parallel degree "
        f"ring·ulysses={sequence_degree}; valid degrees: {', '.join(map(str, valid))} (set "
        "parallel.ring/parallel.ulysses, or another model.image_size), or use attention.backend=native, which pads "
        "instead"
    )


UNAVAILABLE = (
    "attention.backend=xfuser cannot run here: {reason}. Use attention.backend=native (our Ulysses/Ring on "
    "torch.distributed, works on CPU and GPU)"
)


def require_xfuser():
    """Import what the backend needs or raise RuntimeError saying why and naming ``attention.backend=native``.
    Returns ``(xFuserLongContextAttention, AttnType, xfuser.core.distributed)``."""
    if torch.version.cuda is None and torch.version.hip is None:
        raise RuntimeError(
            UNAVAILABLE.format(reason="this torch is a CPU build and xfuser imports need triton and a GPU")
        )
    if not torch.cuda.is_available():
        raise RuntimeError(UNAVAILABLE.format(reason="no CUDA device is available"))
    try:
        import yunchang.ring.utils as ring_utils

        # xfuser 0.7.0 imports update_npu_out, which no released yunchang (<= 0.6.4) defines.
        if not hasattr(ring_utils, "update_npu_out"):
            ring_utils.update_npu_out = None
        import xfuser.core.distributed as xdist
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.kernels import AttnType
    except ImportError as err:
        raise RuntimeError(UNAVAILABLE.format(reason=f"{err} (install the extra: pip install -e .[xdit])")) from err
    except (NotImplementedError, RuntimeError) as err:
        raise RuntimeError(UNAVAILABLE.format(reason=f"importing xfuser failed: {err}")) from err
    return xFuserLongContextAttention, AttnType, xdist


class XfuserSequence(DistributedSequence):
    """Tokens are sharded as in ``DistributedSequence``; joint attention goes through xfuser's USP. xfuser builds
    its own process groups (same rank layout as our mesh: ulysses innermost, then ring, cfg, data)."""

    def __init__(
        self, ring_group=None, ulysses_group=None, kernel: str = "sdpa", data_degree: int = 1, cfg_degree: int = 1
    ) -> None:
        long_context_attention, attn_type, xdist = require_xfuser()
        super().__init__(ring_group=ring_group, ulysses_group=ulysses_group, kernel=kernel)
        if not xdist.model_parallel_is_initialized():
            xdist.init_distributed_environment(rank=dist.get_rank(), world_size=dist.get_world_size())
            xdist.initialize_model_parallel(
                data_parallel_degree=data_degree,
                classifier_free_guidance_degree=cfg_degree,
                sequence_parallel_degree=self.world,
                ulysses_degree=self.ulysses_size,
                ring_degree=self.ring_size,
            )
        self.attn = long_context_attention(attn_type=attn_type.FA if kernel == "flash" else attn_type.TORCH)

    def __repr__(self) -> str:
        return f"XfuserSequence(ring={self.ring_size}, ulysses={self.ulysses_size})"

    def shard_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        problem = xfuser_token_problem(x.shape[dim], self.world, "image tokens")
        if problem is not None:
            raise ValueError(problem)
        return super().shard_tokens(x, dim)

    def _joint(self, img_q, img_k, img_v, txt_q, txt_k, txt_v, num_img: int):
        """xfuser's USP over ``[img; txt]`` (every text token given is valid: ``joint_attention`` drops the
        padded ones and attends them in their own segment)."""
        num_local = img_q.shape[1]
        out = self.attn(
            None,
            img_q,
            img_k,
            img_v,
            joint_tensor_query=txt_q,
            joint_tensor_key=txt_k,
            joint_tensor_value=txt_v,
            joint_strategy="rear",
        )
        return out[:, :num_local], out[:, num_local:]
