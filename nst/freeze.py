"""What a fine-tune keeps fixed. The official code's `--fix_layer_num N` freezes the stem and the first N blocks and
runs their BatchNorm in inference mode, the rest (head included) trains; here the stem and blocks (or stages) come
from the model's own timm structure (`group_matcher`, what timm's layer decay groups by), and any module or
parameter can also be picked by name (`encoder.layers.0`, `*.attn.qkv`, `*fc1*`)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from timm.models import group_parameters

from nst.config import FreezeConfig
from nst.errors import ConfigError, quote

FIELD = "finetune.freeze"


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def frozen_parameters(model: torch.nn.Module, spec: FreezeConfig, model_name: str) -> set[str]:
    """Names of the parameters `spec` fixes; a selection that fits nothing in the model, or fixes all of it, is a
    ConfigError naming the field."""
    names: set[str] = set()
    count, unit = (spec.blocks, "blocks") if spec.blocks is not None else (spec.stages, "stages")
    if count is not None:
        if not hasattr(model, "group_matcher"):
            raise ConfigError(f"{FIELD}.{unit}: {model_name} has no timm group_matcher; pick layers by name with "
                              f"{FIELD}.patterns")
        groups = group_parameters(model, model.group_matcher(coarse=unit == "stages"))  # 0 = stem, last = head
        have = len(groups) - 2
        if count > have:
            raise ConfigError(f"{FIELD}.{unit} = {count}: {model_name} has {have} {unit} after its stem (timm's "
                              "group_matcher)")
        for gid in range(count + 1):
            names |= set(groups[gid])
    params = [n for n, _ in model.named_parameters()]
    for pat in spec.patterns:
        hit = {n for n in params if any(fnmatchcase(p, pat) for p in _prefixes(n))}
        if not hit:
            raise ConfigError(f"{FIELD}.patterns: {quote(pat)} matches no module or parameter of {model_name} "
                              f"(names look like {quote(params[0])})")
        names |= hit
    if names and len(names) == len(params):
        raise ConfigError(f"{FIELD}: fixes every parameter of {model_name}; nothing would be fine-tuned")
    return names


def freeze(model: torch.nn.Module, spec: FreezeConfig, model_name: str) -> dict[str, torch.nn.Module]:
    """Fix the selected parameters (requires_grad off) and return, by name, the modules that must stay in eval mode
    while the rest trains: the largest ones whose every parameter is fixed (their BatchNorm statistics, dropout and
    stochastic depth then stay as they are), and any module a pattern names."""
    fixed = frozen_parameters(model, spec, model_name)
    for n, p in model.named_parameters():
        if n in fixed:
            p.requires_grad_(False)
    keep: list[tuple[str, torch.nn.Module]] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(k + ".") for k, _ in keep):
            continue
        own = [p for p in m.parameters()]
        named = any(fnmatchcase(name, pat) for pat in spec.patterns)
        if (own and not any(p.requires_grad for p in own)) or named:
            keep.append((name, m))
    return dict(keep)
