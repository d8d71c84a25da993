"""Checkpoints as safetensors + a JSON sidecar; training state via torch.save loaded with weights_only=True.

Nothing here unpickles arbitrary objects. The sidecar (`model.json`) is written last and is the marker that a
model is complete: a later stage trusts a model folder only when its sidecar exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

import models  # noqa: F401 - registers our models in timm
from nst.io import atomic_path, atomic_write_json, read_json

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    return Path(path)


def save_state(path: Path, obj: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / SIDECAR).is_file() and (Path(model_dir) / WEIGHTS).is_file()


def read_meta(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not is_complete(model_dir):
        raise FileNotFoundError(f"{model_dir}: no finished model here ({SIDECAR} missing); run its training stage first")
    return read_json(model_dir / SIDECAR)


def finish_model(model_dir: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    save_weights(Path(model_dir) / WEIGHTS, state)
    atomic_write_json(Path(model_dir) / SIDECAR, meta)
    return Path(model_dir)


def build_model(name: str, num_classes: int, dropout: float = 0.0, drop_path: float = 0.0) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, drop_rate=dropout, drop_path_rate=drop_path)


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The finished model in eval mode (no noise): the weights chosen at training time (EMA when enabled)."""
    meta = read_meta(model_dir)
    model = build_model(meta["model"], meta["num_classes"])
    model.load_state_dict(load_file(str(Path(model_dir) / WEIGHTS)))
    return model.to(device).eval(), meta
