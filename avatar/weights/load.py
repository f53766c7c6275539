"""Strict DiT loading: the official ``.pt`` (``{'module'|'ema': state_dict}``), its fp8 variant with the scale map,
and safetensors shards; plus the writers of those formats (tests and the tiny-weights maker).

Nothing pickled is executed: ``.pt`` files are read with ``torch.load(weights_only=True, mmap=True)``, so tensors stay
file-backed until they are cast or moved. The model is built on the meta device and the checkpoint tensors are
assigned into it, so host memory holds one copy of the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from avatar.config import OFFICIAL_DIT_FILE, OFFICIAL_DIT_FP8_FILE, ModelConfig
from avatar.io.errors import InputError
from avatar.models.transformer import AvatarDiT
from avatar.weights.files import safe_torch_load, safetensors_header
from avatar.weights.fp8 import convert_to_fp8, enable_fp8_compute, quantize_fp8
from avatar.weights.layout import FP8_DTYPE, expected_state_dict, fp8_map_path, is_fp8_weight

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """The checkpoint does not match the model; the message lists every problem, one per line."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def dit_checkpoint_files(weights: str | Path, fp8: bool = False) -> list[Path]:
    """The DiT file(s) of ``weights``: a checkpoint file itself, or a weights folder (official ``.pt``, else
    ``*.safetensors`` shards in the transformers folder)."""
    path = Path(weights)
    if path.is_file():
        return [path]
    official = path / (OFFICIAL_DIT_FP8_FILE if fp8 else OFFICIAL_DIT_FILE)
    if official.is_file():
        return [official]
    if not fp8:
        for folder in (official.parent, path):
            shards = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
            if shards:
                return shards
    raise InputError(
        f"weights={path}: no DiT checkpoint ({official} not found" + ("" if fp8 else ", no *.safetensors") + ")"
    )


def _torch_load(path: Path) -> dict:
    """Tensors-only load; truncated, corrupt or unsafe files raise ``BadCheckpoint`` (one line, "re-download it")."""
    return safe_torch_load(path)


#: safetensors dtype names -> torch dtypes (the ones a DiT checkpoint may hold).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_metadata(files: list[Path], load_key: str = "module") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the checkpoint without reading tensor data."""
    metadata = {}
    for path in files:
        if path.suffix == ".safetensors":
            for key, entry in safetensors_header(path).items():
                metadata[key] = (tuple(entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"], torch.uint8))
            continue
        metadata.update({key: (tuple(t.shape), t.dtype) for key, t in _read_pt(path, load_key).items()})
    return metadata


def _read_pt(path: Path, load_key: str) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if not isinstance(obj, dict) or load_key not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointMismatch(f"{path}: no '{load_key}' entry (found {found}); load_key is 'module' or 'ema'")
    return dict(obj[load_key])


def read_state_dict(
    files: list[Path],
    load_key: str = "module",
    *,
    dtypes: dict[str, torch.dtype] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint (``.pt``: ``obj[load_key]``, memory-mapped; safetensors: shard by shard). With
    ``dtypes``, each tensor is cast and moved as it is read, so no second full copy is alive."""

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if dtypes is None else tensor.to(device=device, dtype=dtypes[key])

    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    state[key] = convert(key, shard.get_tensor(key))
            continue
        for key, tensor in _read_pt(path, load_key).items():
            state[key] = convert(key, tensor)
    return state


def read_fp8_scales(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Layer name -> scale from the ``_map.pt`` beside ``checkpoint``."""
    map_path = fp8_map_path(checkpoint)
    if not map_path.is_file():
        raise InputError(f"fp8=true: scale map {map_path} not found (it must sit beside {checkpoint})")
    obj = _torch_load(map_path)
    if not isinstance(obj, dict) or "module" not in obj:
        raise CheckpointMismatch(f"{map_path}: no 'module' entry")
    return dict(obj["module"])


def _describe(shape, dtype) -> str:
    return f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"


def _wrong_dtype(expected: torch.dtype, found: torch.dtype) -> bool:
    """fp8 entries must be float8; any other entry may be any non-fp8 float (it is cast on load)."""
    if expected == FP8_DTYPE:
        return found != FP8_DTYPE
    return not found.is_floating_point or found.itemsize == 1


def compare_state_dict(
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    found: dict[str, tuple[tuple[int, ...], torch.dtype]],
    scales: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Every difference: missing, unexpected, mis-shaped or wrongly typed entries (and fp8 scales)."""
    problems = []
    for key, (shape, dtype) in expected.items():
        if key not in found:
            problems.append(f"missing key {key} (expected {_describe(shape, dtype)})")
            continue
        found_shape, found_dtype = found[key]
        if tuple(found_shape) != tuple(shape):
            problems.append(
                f"wrong shape {key}: expected {_describe(shape, dtype)}, found {_describe(found_shape, found_dtype)}"
            )
        elif _wrong_dtype(dtype, found_dtype):
            problems.append(
                f"wrong dtype {key}: expected {_describe(shape, dtype)}, found {_describe(found_shape, found_dtype)}"
            )
    for key in sorted(set(found) - set(expected)):
        problems.append(f"unexpected key {key} (found {_describe(*found[key])})")
    if scales is not None:
        layers = {key.removesuffix(".weight") for key, (_, dtype) in expected.items() if dtype == FP8_DTYPE}
        for name in sorted(layers - set(scales)):
            problems.append(f"missing fp8 scale {name} in the _map.pt")
        for name in sorted(set(scales) - layers):
            problems.append(f"unexpected fp8 scale {name} in the _map.pt")
    return problems


def verify_dit_checkpoint(
    checkpoint: str | Path, cfg: ModelConfig, *, fp8: bool = False, load_key: str = "module"
) -> list[str]:
    """Every problem of the DiT checkpoint (file or weights folder) against ``cfg``, from metadata only."""
    try:
        files = dit_checkpoint_files(checkpoint, fp8)
        found = read_metadata(files, load_key)
        scales = read_fp8_scales(files[0]) if fp8 else None
    except ValueError as err:
        return [str(err)]
    return compare_state_dict(expected_state_dict(cfg, fp8=fp8), found, scales)


def load_dit(
    weights_dir: str | Path,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    fp8: bool = False,
    load_key: str = "module",
    fp8_compute: bool = False,
) -> AvatarDiT:
    """Build the DiT and load its weights strictly (raises ``CheckpointMismatch`` listing every problem). With
    ``fp8`` and ``fp8_compute`` the fp8 linears run as scaled fp8 matmuls (``avatar/weights/fp8.py``)."""
    files = dit_checkpoint_files(weights_dir, fp8)
    found = read_metadata(files, load_key)
    scales = read_fp8_scales(files[0]) if fp8 else None

    with torch.device("meta"):
        model = AvatarDiT(cfg, dtype=dtype)
    fp8_layers = convert_to_fp8(model) if fp8 else []
    expected = {key: (tuple(t.shape), t.dtype) for key, t in model.state_dict().items()}
    problems = compare_state_dict(expected, found, scales)
    if problems:
        where = ", ".join(str(f) for f in files)
        raise CheckpointMismatch(
            f"{where} does not match model '{cfg.name}' ({len(problems)} problems):\n" + "\n".join(problems)
        )

    tensors = read_state_dict(
        files, load_key, dtypes={key: dtype for key, (_, dtype) in expected.items()}, device=device
    )
    model.load_state_dict(tensors, strict=True, assign=True)
    for name in fp8_layers:
        model.get_submodule(name).scale = scales[name].to(device=device, dtype=torch.float32).reshape(())
    if fp8 and fp8_compute:
        enable_fp8_compute(model)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointMismatch(f"not loaded: {still_meta}")
    model.requires_grad_(False)
    model.eval()
    log.info("loaded DiT from %s (%d tensors, %s%s)", files[0], len(tensors), dtype, _fp8_note(fp8, fp8_compute))
    return model


def _fp8_note(fp8: bool, fp8_compute: bool) -> str:
    if not fp8:
        return ""
    return ", fp8 blocks, scaled fp8 matmuls" if fp8_compute else ", fp8 blocks, dequantised per call"


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def save_official_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path, key: str = "module") -> Path:
    """Write ``{key: state_dict}`` as the official ``.pt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: {k: v.detach().contiguous() for k, v in state_dict.items()}}, path)
    return path


def save_fp8_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path) -> tuple[Path, Path]:
    """Write the official fp8 pair: ``path`` (block Linear weights in float8, the rest as given) and its
    ``_map.pt`` (``{'module': {layer_name: scale}}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, scales = {}, {}
    for key, value in state_dict.items():
        if is_fp8_weight(key, tuple(value.shape)):
            tensors[key], scales[key.removesuffix(".weight")] = quantize_fp8(value)
        else:
            tensors[key] = value.detach().contiguous()
    torch.save({"module": tensors}, path)
    map_path = fp8_map_path(path)
    torch.save({"module": scales}, map_path)
    return path, map_path
