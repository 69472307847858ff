"""Load and save Qwen checkpoints: a local folder or a hub id, in the Qwen2 (HF) or the Qwen-1 layout.

Loading is careful about two things a textbook reader will hit on a laptop:

* **Memory.** The model is built on the ``meta`` device (shapes only, no storage). Each parameter
  is then allocated once, in the requested dtype and device, and filled from the memory-mapped
  ``.safetensors`` file in row chunks (re-opening the map so that only one chunk of file pages is
  resident at a time). Peak memory stays near one copy of the weights.
* **Clear failures.** Keys, shapes and dtypes are checked from the safetensors *headers* before a
  single weight is read. Missing keys, unexpected keys, shape mismatches, a config that does not fit
  the weights, a truncated file or a broken index each raise a :class:`CheckpointError` that names
  the problem; nothing half-loaded is ever returned.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qwen_edu.models.config import dtype_from_str, dtype_to_str
from qwen_edu.models.layouts import Placement, TensorSource, WeightLayout, source_parts
from qwen_edu.models.registry import entry_for_config

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "ConfigMismatchError",
    "StateDictMismatchError",
    "TensorInfo",
    "load_model",
    "save_model",
    "resolve_checkpoint",
    "read_checkpoint_config",
    "scan_safetensors",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_CHUNK_BYTES = 64 * 2**20  # file pages resident at once while copying
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file or key and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No such local folder (and not fetchable from the hub), or a required file is missing."""


class CorruptCheckpointError(CheckpointError):
    """A file exists but cannot be parsed: truncated safetensors, invalid JSON, broken index."""


class StateDictMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model: missing / unexpected keys, wrong shapes."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


class ConfigMismatchError(StateDictMismatchError):
    """``config.json`` describes a different model than the one whose weights are in the folder."""


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------------
def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (config + safetensors) to the HF cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; pass the checkpoint folder that contains it")
    repo_id = os.fspath(path_or_hub_id)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.startswith((".", "~")):
            raise HFValidationError("looks like a path")
    except HFValidationError:
        raise CheckpointNotFoundError(
            f"checkpoint {repo_id!r} not found: there is no such local folder, and it is not a valid "
            "Hugging Face hub id (expected 'org/name', e.g. 'Qwen/Qwen2-0.5B')"
        ) from None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=repo_id, revision=revision,
                                   allow_patterns=["*.json", "*.safetensors", "*.txt", "*.tiktoken"])
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise CheckpointNotFoundError(
            f"checkpoint {repo_id!r}: no such local folder, and downloading it from the Hugging Face hub "
            f"failed ({type(exc).__name__}: {exc})"
        ) from exc
    return Path(folder)


def read_checkpoint_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} is missing: a checkpoint folder needs a config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} should hold a JSON object, found {type(config).__name__}")
    return config


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a folder, and the index's key -> file map if it is sharded."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            with open(index_path, encoding="utf-8") as fh:
                index = json.load(fh)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{index_path} is not a valid safetensors index: {exc!r}") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{index_path} refers to shard file(s) that do not exist: {missing}")
        return [folder / f for f in files], weight_map
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single], None
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1:
        return [folder / others[0]], None
    hint = " (PyTorch .bin checkpoints are not supported; convert them to safetensors)" if any(
        folder.glob("*.bin")) else ""
    raise CheckpointNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}{hint}")


def scan_safetensors(folder: str | os.PathLike) -> dict[str, TensorInfo]:
    """Key -> (file, shape, dtype) for every tensor of the checkpoint, read from the headers only."""
    folder = Path(folder)
    files, weight_map = _weight_files(folder)
    infos: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as fh:
                for key in fh.keys():
                    view = fh.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise CorruptCheckpointError(f"{file}: tensor {key!r} has unsupported dtype {view.get_dtype()}")
                    if key in infos:
                        raise CorruptCheckpointError(f"tensor {key!r} appears in both {infos[key].file} and {file}")
                    infos[key] = TensorInfo(file, tuple(view.get_shape()), dtype)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error type for truncated / garbled files
            raise CorruptCheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from exc
    if weight_map is not None:
        wrong = [k for k, f in weight_map.items() if k not in infos or infos[k].file.name != Path(f).name]
        if wrong:
            raise CorruptCheckpointError(
                f"{folder / INDEX_NAME} does not match the shard files: {_listing(wrong)} are not where the "
                "index says they are"
            )
    return infos


# ---------------------------------------------------------------------------------------------------
# Checking before loading
# ---------------------------------------------------------------------------------------------------
def _listing(items: Iterable[Any], limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _source_shape(info: TensorInfo, src: TensorSource) -> tuple[int, ...] | None:
    if src.rows is None:
        return info.shape
    a, b = src.rows
    if not info.shape or b > info.shape[0]:
        return None  # the fused tensor is too small for the slice the config implies
    return (b - a, *info.shape[1:])


#: One parameter's reading plan: which slice of it (``()`` = all) comes from which checkpoint tensor.
_Plan = dict[str, list[tuple[Placement, TensorInfo]]]


def _plan(model: nn.Module, layout: WeightLayout, config: Any, infos: dict[str, TensorInfo]) -> _Plan:
    """Map every parameter (or slice of one) to its checkpoint tensor, or raise listing everything that
    does not fit. ``layout`` is the entry's layout as chosen for this checkpoint's keys."""
    params = dict(model.named_parameters())  # tied lm_head appears once, as the embedding
    sources = layout.sources(params, config)
    plan: _Plan = {}
    missing: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, param in params.items():
        parts = source_parts(sources[name])
        for part in parts:
            src = part.source
            info = infos.get(src.key)
            if info is None:
                missing.append(src.key if src.key == name else f"{src.key} (for {name})")
                continue
            found = _source_shape(info, src)
            expected = tuple(param[part.slices()].shape)
            if found != expected:
                label = src.key if src.rows is None else f"{src.key}[{src.rows[0]}:{src.rows[1]}]"
                label += f" (for {name})" if src.rows is not None or part.index else ""
                mismatched.append((label, expected, found if found is not None else info.shape))
                continue
            plan.setdefault(name, []).append((part, info))
    used = {part.source.key for src in sources.values() for part in source_parts(src)}
    tied_head = getattr(config, "tie_word_embeddings", False)
    unexpected = [k for k in infos if k not in used and not layout.ignorable.fullmatch(k)
                  and not (tied_head and k == "lm_head.weight")]
    if missing or unexpected or mismatched:
        raise _mismatch_error(config, infos, missing, unexpected, mismatched, layout)
    return plan


def _mismatch_error(config: Any, infos: dict[str, TensorInfo], missing: list[str], unexpected: list[str],
                    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
                    layout: WeightLayout | None = None) -> StateDictMismatchError:
    """Build the error; if the pattern says "the config describes another model", say that first."""
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): " + _listing(
            f"{k}: expected {list(e)}, found {list(f)}" for k, e, f in mismatched))
    hints = _config_hints(config, infos, missing)
    if layout is not None:
        hints += layout.hints(config, {k: i.shape for k, i in infos.items()})
    if hints:
        message = "config.json does not match the weights: " + "; ".join(hints) + "\n  " + "\n  ".join(lines)
        return ConfigMismatchError(message, missing, unexpected, mismatched)
    return StateDictMismatchError("checkpoint does not fit the model:\n  " + "\n  ".join(lines),
                                  missing, unexpected, mismatched)


def _config_hints(config: Any, infos: dict[str, TensorInfo], missing: list[str]) -> list[str]:
    hints = []
    layers = {int(m.group(1)) for k in infos if (m := re.search(r"\.(?:layers|h)\.(\d+)\.", k))}
    n_layers = getattr(config, "num_hidden_layers", None)
    if layers and n_layers is not None and len(layers) != n_layers:
        hints.append(f"config says num_hidden_layers={n_layers}, the weights have {len(layers)} layers")
    embed = infos.get("model.embed_tokens.weight") or infos.get("transformer.wte.weight")
    if embed is not None and len(embed.shape) == 2:
        vocab, hidden = embed.shape
        if getattr(config, "vocab_size", vocab) != vocab:
            hints.append(f"config says vocab_size={config.vocab_size}, the embedding has {vocab} rows")
        if getattr(config, "hidden_size", hidden) != hidden:
            hints.append(f"config says hidden_size={config.hidden_size}, the embedding is {hidden} wide")
    if any(m.startswith("lm_head.weight") for m in missing) and not getattr(config, "tie_word_embeddings", True):
        hints.append("config says tie_word_embeddings=false but the weights have no lm_head.weight")
    return hints


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
class _MappedReader:
    """Hands out row slices of safetensors tensors as views of the memory-mapped files.

    A ``safe_open`` handle maps the whole file, and every page we touch through it stays resident
    until the handle and all views of it are gone. Re-opening a file's map after ``budget`` bytes
    have been read through it bounds that extra resident memory to about ``budget``, while a few
    dozen re-opens (instead of one per tensor) keep loading fast.
    """

    def __init__(self, budget: int = _CHUNK_BYTES) -> None:
        self.budget = budget
        self.handles: dict[Path, Any] = {}
        self.used: dict[Path, int] = {}

    def rows(self, file: Path, key: str, a: int, b: int, nbytes: int) -> torch.Tensor:
        if file not in self.handles or self.used[file] + nbytes > self.budget:
            self.handles.pop(file, None)  # release the old map (and its resident pages) first
            self.handles[file] = safe_open(file, framework="pt")
            self.used[file] = 0
        self.used[file] += nbytes
        return self.handles[file].get_slice(key)[a:b]

    def close(self) -> None:
        self.handles.clear()


def _copy_into(target: torch.Tensor, file: Path, key: str, rows: tuple[int, int] | None,
               reader: _MappedReader | None = None) -> None:
    """Fill ``target`` (any dtype/device) from ``file[key][rows]``, at most ``_CHUNK_BYTES`` at a time."""
    reader = reader if reader is not None else _MappedReader()
    if target.dim() == 0:
        target.copy_(reader.rows(file, key, 0, 1, target.element_size()).reshape(()))
        return
    first, last = rows if rows is not None else (0, target.shape[0])
    row_bytes = max(1, target[0].numel() * target.element_size())
    step = max(1, _CHUNK_BYTES // row_bytes)
    for a in range(first, last, step):
        b = min(a + step, last)
        chunk = reader.rows(file, key, a, b, (b - a) * row_bytes)
        target[a - first:b - first].copy_(chunk)
        del chunk


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _default_dtype(infos: dict[str, TensorInfo], config: Any) -> torch.dtype:
    """The checkpoint's own float dtype (no conversion = no extra memory), else the config's, else fp32."""
    float_dtypes = {i.dtype for i in infos.values() if i.dtype.is_floating_point}
    if len(float_dtypes) == 1:
        return float_dtypes.pop()
    return dtype_from_str(getattr(config, "torch_dtype", None)) or torch.float32


def load_model(path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, *, attn_implementation: str | None = None,
               revision: str | None = None) -> nn.Module:
    """Load a Qwen checkpoint (folder or hub id) as a ready-to-run model in eval mode.

    ``dtype=None`` keeps the dtype stored in the checkpoint; ``device=None`` means CPU.
    ``attn_implementation`` is ``"sdpa"`` (default) or ``"eager"``. The architecture is chosen from
    ``config.json``'s ``model_type`` through :mod:`qwen_edu.models.registry`.
    """
    folder = resolve_checkpoint(path_or_hub_id, revision)
    raw_config = read_checkpoint_config(folder)
    entry = entry_for_config(raw_config)
    try:
        config = entry.config_from_hf(raw_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{folder / CONFIG_NAME} is not a usable {entry.model_type} config: {exc!r}") from exc
    if attn_implementation is not None:
        config.attn_implementation = attn_implementation
        config.__post_init__()
    infos = scan_safetensors(folder)
    target_dtype = dtype_from_str(dtype) or _default_dtype(infos, config)
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    if target_dtype.is_floating_point and getattr(config, "torch_dtype", None) is None:
        config.torch_dtype = dtype_to_str(target_dtype)

    with torch.device("meta"):
        model = entry.model_class(config)
    layout = entry.layout.for_checkpoint(infos.keys(), config)
    plan = _plan(model, layout, config, infos)  # raises before any weight is read

    reader = _MappedReader()
    try:
        for name, param in list(model.named_parameters()):
            tensor = torch.empty(param.shape, dtype=target_dtype if param.is_floating_point() else param.dtype,
                                 device=target_device)
            for part, info in plan[name]:  # a stacked parameter is filled slice by slice, in place
                src = part.source
                try:
                    _copy_into(tensor[part.slices()], info.file, src.key, src.rows, reader)
                except Exception as exc:
                    raise CorruptCheckpointError(f"{info.file}: reading tensor {src.key!r} failed: {exc}") from exc
            _set_parameter(model, name, tensor)
    finally:
        reader.close()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(target_device)  # buffers (RoPE frequencies) follow the weights
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:  # cannot happen with a correct plan; never hand out a half-loaded model
        raise CheckpointError(f"internal error: tensors left uninitialised: {_listing(leftover)}")
    model.name_or_path = os.fspath(path_or_hub_id)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse shard size {size!r} (try '2GB' or an int of bytes)")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # Write to a temp file and rename: the file we are replacing may still be memory-mapped by a
    # loaded model, and truncating it in place would pull the pages out from under that model.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_model(model: nn.Module, folder: str | os.PathLike, *, max_shard_size: int | str | None = None,
               layout: WeightLayout | None = None) -> Path:
    """Write ``config.json`` and safetensors weights in the model's own layout (Qwen2, Qwen-1, MoE ...).

    With ``max_shard_size`` the weights are split into ``model-0000i-of-0000n.safetensors`` files
    plus a ``model.safetensors.index.json``, like ``save_pretrained``. A tied head is not stored.
    ``layout`` overrides the registered one (e.g. ``MoeLayout(fused=True)`` for fused expert tensors).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config  # type: ignore[attr-defined]
    entry = entry_for_config(config.to_hf_config())
    state = {name: p.detach() for name, p in model.named_parameters()}
    layout = layout if layout is not None else entry.layout
    tensors = {k: v.to("cpu").contiguous() for k, v in layout.to_checkpoint(state, config).items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    written = {WEIGHTS_NAME}
    if len(shards) == 1:
        _atomic_save(shards[0], folder / WEIGHTS_NAME)
    else:
        weight_map = {}
        written = {INDEX_NAME}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
            written.add(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(folder / INDEX_NAME, "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_NAME]:  # from an earlier save
        if stale.name not in written and stale.exists():
            stale.unlink()
    dtype = next(iter(state.values())).dtype if state else torch.float32
    config.replace(torch_dtype=dtype_to_str(dtype)).save(folder)
    return folder
