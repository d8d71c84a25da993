"""Checkpoints as safetensors + a JSON sidecar; training state via torch.save loaded with weights_only=True.

Nothing here unpickles arbitrary objects. The sidecar (`model.json`) is written last and is the marker that a
model is complete. Every file we read back may have been damaged or swapped: each failure is a one-line error
naming the file (never torch's advice to pass weights_only=False).
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import models  # noqa: F401 - registers our models in timm
from nst.errors import DataError
from nst.io import atomic_path, atomic_write_json, read_json

log = logging.getLogger("nst.checkpoint")

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"
STATE = "train_state.pt"


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    return Path(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:160]})") from None


def save_state(path: Path, obj: dict[str, Any]) -> Path:
    """Through a file object: torch.save to a path names the archive after the (temp) file, so two identical runs
    would write different bytes."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return Path(path)


def _torch_load(path: Path, what: str) -> Any:
    """torch.load(weights_only=True): nothing is unpickled but tensors and plain containers. A file it refuses
    (truncated, empty, foreign, or a pickle with code in it) is a DataError naming it - without torch's advice to
    set weights_only=False, which is the one thing not to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError,
            KeyError, TypeError) as e:
        reason = "empty file" if Path(path).stat().st_size == 0 else str(e).splitlines()[0]
        reason = reason.split("weights_only")[0].rstrip(" .(")[:120] or "unreadable"
        raise DataError(f"{path}: not {what} ({reason})") from None


def load_state(path: Path) -> dict[str, Any]:
    """The resume state; a truncated, empty or foreign file raises DataError (the caller sets it aside)."""
    st = _torch_load(path, "a valid training-state file")
    if not isinstance(st, dict) or "epoch" not in st:
        raise DataError(f"{path}: not a valid training-state file (no epoch)")
    return st


def set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way (kept for inspection) instead of deleting or trusting it."""
    n = 0
    while (dest := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    os.replace(path, dest)
    return dest


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / SIDECAR).is_file() and (Path(model_dir) / WEIGHTS).is_file()


def read_meta(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not is_complete(model_dir):
        raise FileNotFoundError(f"{model_dir}: no finished model here ({SIDECAR} missing); run its training stage first")
    meta = read_json(model_dir / SIDECAR)
    f = model_dir / SIDECAR
    if not isinstance(meta, dict):
        raise DataError(f"{f}: expected a JSON object")
    for key, typ in (("model", str), ("num_classes", int), ("classes", list)):
        if not isinstance(meta.get(key), typ):
            raise DataError(f"{f}: field {key!r} is missing or not a {typ.__name__}")
    if ":" in meta["model"] or "/" in meta["model"] or not timm.is_model(meta["model"]):
        raise DataError(f"{f}: model = {meta['model'][:80]!r} is not a model registered in timm")
    if meta["num_classes"] != len(meta["classes"]) or meta["num_classes"] < 2:
        raise DataError(f"{f}: num_classes = {meta['num_classes']} does not match its {len(meta['classes'])} classes")
    return meta


def finish_model(model_dir: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    save_weights(Path(model_dir) / WEIGHTS, state)
    atomic_write_json(Path(model_dir) / SIDECAR, meta)
    return Path(model_dir)


def build_model(name: str, num_classes: int, dropout: float = 0.0, drop_path: float = 0.0) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, drop_rate=dropout, drop_path_rate=drop_path)


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, *, drop_head: bool = False) -> None:
    """Load `state` into `model`; with `drop_head`, classifier tensors of another shape are left at their fresh
    init (fine-tuning to our classes). Anything else that does not fit is a one-line error naming the file."""
    own = model.state_dict()
    head = set()
    if drop_head and hasattr(model, "get_classifier"):
        cls = model.get_classifier()
        head = {k for k, v in own.items() if any(v is p for p in list(cls.parameters()) + list(cls.buffers()))}
        head |= {k for k in own if k.startswith(("fc.", "head.", "classifier.", "head.fc."))}
    for prefix in ("module.", "model."):  # DDP / wrapper prefixes
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k not in head]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    if bad_shape or missing or unexpected:
        what = (f"shape mismatch for {bad_shape[0]!r} ({tuple(state[bad_shape[0]].shape)} vs "
                f"{tuple(own[bad_shape[0]].shape)})" if bad_shape else
                f"{len(missing)} tensors missing, e.g. {missing[0]!r}" if missing else
                f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]!r}")
        raise DataError(f"{source}: does not fit the model ({what})")
    keep = {k: v for k, v in state.items() if k not in head or own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)


def read_checkpoint_file(path: Path) -> dict[str, torch.Tensor]:
    """A local pretrained checkpoint: safetensors, or a torch/timm file loaded with weights_only=True (unwrapping
    `state_dict_ema` / `state_dict` / `model`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_weights(path)
    obj = _torch_load(path, "a safetensors file or a weights-only torch checkpoint")
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: does not hold a state dict of tensors")
    return obj


def init_model(tc, num_classes: int, field: str) -> torch.nn.Module:
    """The model of a training config, from scratch or from pretrained weights (classifier re-initialised)."""
    if tc.pretrained:
        try:
            return timm.create_model(tc.model, pretrained=True, num_classes=num_classes, drop_rate=tc.noise.dropout,
                                     drop_path_rate=tc.noise.drop_path)
        except Exception as e:  # noqa: BLE001 - hub/network/weights problems all end the same way
            raise DataError(f"{field}.pretrained: could not get timm's pretrained weights for {tc.model!r} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    model = build_model(tc.model, num_classes, tc.noise.dropout, tc.noise.drop_path)
    if tc.pretrained_file is not None:
        load_into(model, read_checkpoint_file(tc.pretrained_file), tc.pretrained_file, drop_head=True)
        log.info("%s: initialised from %s (classifier re-initialised for %d classes)", field, tc.pretrained_file.name,
                 num_classes)
    return model


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The finished model in eval mode (no noise): the weights chosen at training time (EMA when enabled)."""
    meta = read_meta(model_dir)
    model = build_model(meta["model"], meta["num_classes"])
    load_into(model, load_weights(Path(model_dir) / WEIGHTS), Path(model_dir) / WEIGHTS)
    return model.to(device).eval(), meta
