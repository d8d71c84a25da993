"""Checks of a config against the installed models, before any compute. Validation only: it can stop a run, never
change what a run writes (so it is not part of any stage's code version)."""

from __future__ import annotations

from nst.config import Config, ConfigError
from nst.errors import quote


def check_model_sizes(cfg: Config, source: str = "params.yaml") -> None:
    """Unknown model names and students smaller than their teacher fail before any training."""
    from models import param_count  # local import: building models pulls in torch

    n_classes = len(cfg.data.classes) if cfg.data.classes else 10
    names = [("teacher.model", cfg.teacher)] + [
        (f"generations[{i}].student.model", g.student) for i, g in enumerate(cfg.generations)
    ]
    counts: dict[str, int] = {}
    for field, tc in names:
        try:
            counts[field] = param_count(tc.model, n_classes)
        except KeyError:
            raise ConfigError(f"{source}: {field} = {quote(tc.model)}: unknown model (not in timm's registry)") from None
    prev_field, prev = "teacher.model", counts["teacher.model"]
    for i, g in enumerate(cfg.generations):
        field = f"generations[{i}].student.model"
        if counts[field] < prev and not g.allow_smaller:
            raise ConfigError(
                f"{source}: {field} = {g.student.model!r}: student has {counts[field]:,} parameters, fewer than its "
                f"teacher {prev_field} ({prev:,}); use an equal-or-larger student or set generations[{i}].allow_smaller: true"
            )
        prev_field, prev = field, counts[field]
    for field, tc in names:
        f = tc.pretrained_file
        if f is not None and not f.is_file():
            raise ConfigError(f"{source}: {field.replace('.model', '.pretrained_file')} = {quote(cfg.rel(f))}: "
                              "file not found")
