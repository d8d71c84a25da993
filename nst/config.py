"""One pydantic tree for `params.yaml`: DVC reads the same file, every stage gets a validated slice of it.

Invalid input fails here, before any compute, with one line per problem naming file, field and value.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from nst.io import text_sha256


class ConfigError(ValueError):
    """A config problem, already phrased for the user (one line per problem)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Image sources: an ImageFolder directory (class sub-folders) or a CSV/Parquet manifest `path,label`."""

    name: str = "toy"
    labeled: Path
    unlabeled: Path
    test: Path
    val: Path | None = None
    unlabeled_truth: Path | None = Field(
        None, description="Optional manifest with the hidden labels of the unlabeled set; only for reporting pseudo-label accuracy."
    )
    image_size: int = Field(32, ge=8, le=1024)
    classes: list[str] | None = Field(None, description="Class names; null = the labeled source's sorted folder names / labels.")
    hflip: bool = Field(False, description="Horizontal flips in training (off for digits and text-like images).")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="Unreadable images are skipped and listed up to this fraction of a split.")
    num_workers: int = Field(0, ge=0, le=64)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError("needs at least 2 distinct class names")
        return v


class NoiseConfig(_Strict):
    """The paper's three noises. RandAugment magnitude is on timm's/TF's 0-30 scale and is NOT clipped to 10."""

    randaugment_n: int = Field(2, ge=0, le=10, description="Ops per image; 0 switches RandAugment off.")
    randaugment_m: float = Field(27.0, ge=0.0, le=30.0)
    randaugment_mstd: float = Field(0.0, ge=0.0, le=100.0)
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Classifier dropout (timm drop_rate).")
    drop_path: float = Field(0.2, ge=0.0, lt=1.0, description="Stochastic depth DROP probability of the last block (paper survival 0.8 => 0.2).")

    @property
    def randaugment(self) -> str | None:
        """timm config string; `mmax` lifts timm's default clip of M to 10."""
        if self.randaugment_n == 0:
            return None
        m = f"{self.randaugment_m:g}"
        s = f"rand-m{m}-n{self.randaugment_n}-mmax{max(self.randaugment_m, 10):g}"
        return s + (f"-mstd{self.randaugment_mstd:g}" if self.randaugment_mstd else "")

    @property
    def off(self) -> bool:
        return self.randaugment_n == 0 and self.dropout == 0 and self.drop_path == 0


class TrainConfig(_Strict):
    model: str = Field("nst_cnn_s", description="Any timm model name, ours (nst_cnn_*) included.")
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    ema: bool = True
    ema_decay: float = Field(0.995, gt=0.0, lt=1.0)
    noise: NoiseConfig = Field(default_factory=lambda: NoiseConfig(randaugment_n=0, dropout=0.0, drop_path=0.0))
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU.")
    channels_last: bool = Field(True, description="channels_last (NHWC) memory format, on CUDA and on CPU (oneDNN).")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs = {self.warmup_epochs} must be < epochs = {self.epochs}")
        return self


class PseudoLabelConfig(_Strict):
    mode: Literal["soft", "hard"] = "soft"
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Soft labels = softmax(logits / T); the paper uses T = 1.")
    top_k: int = Field(5, ge=1, le=1000, description="Soft labels keep the top-k classes, renormalised.")
    batch_size: int = Field(256, ge=1, le=65_536)
    shard_size: int = Field(1000, ge=1, description="Unlabeled images per Parquet shard (one labelling task each).")


class FilterConfig(_Strict):
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="Drop pseudo-labels whose max probability is below this (paper: 0.3).")
    target_per_class: int | None = Field(
        None, ge=1, description="K images per predicted class; null = kept images / number of classes (the balanced set keeps its size)."
    )
    duplicate: bool = Field(True, description="Duplicate (seeded) images of classes with fewer than K.")


class GenerationConfig(_Strict):
    """One noisy-student generation. `teacher` names the previous generation explicitly (DVC's foreach cannot look back)."""

    name: str
    teacher: str
    student: TrainConfig = Field(
        default_factory=lambda: TrainConfig(noise=NoiseConfig())
    )
    ratio: float = Field(3.0, gt=0.0, le=1000.0, description="Unlabeled:labeled batch ratio (paper: 1 for B0, 3 for larger).")
    init: Literal["scratch", "teacher"] = Field("scratch", description="Student init; from scratch is often better (paper finding #8).")
    allow_smaller: bool = Field(False, description="Permit a student with fewer parameters than its teacher.")

    @field_validator("name", "teacher")
    @classmethod
    def _gen_name(cls, v: str) -> str:
        if not re.fullmatch(r"g\d+", v):
            raise ValueError(f"must look like g0, g1, ... (got {v!r})")
        return v

    @property
    def index(self) -> int:
        return int(self.name[1:])


class TrackingConfig(_Strict):
    """Filled in by the MLflow integration; kept here so params.yaml stays the one config file."""

    enabled: bool = True
    tracking_uri: str | None = Field(None, description="null = MLFLOW_TRACKING_URI or a local SQLite file in out_dir.")
    experiment: str = "noisy-student"
    registered_model: str = "noisy-student"


class RobustnessConfig(_Strict):
    """Optional part of `evaluate` (corruptions, perturbation stability, adversarial)."""

    enabled: bool = False
    subset: int = Field(500, ge=1, description="Test images used for the robustness suite.")
    corruptions: list[str] | None = Field(None, description="null = the standard ImageNet-C families that fit small images.")
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    perturbations: list[str] = Field(default_factory=lambda: ["translate", "brightness", "gaussian_noise"])
    perturbation_steps: int = Field(10, ge=2, le=100)
    epsilons: list[float] = Field(default_factory=lambda: [1 / 255, 4 / 255])
    pgd_steps: int = Field(10, ge=1, le=1000)
    adversarial_subset: int = Field(200, ge=1)

    @field_validator("severities")
    @classmethod
    def _sev(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if s not in (1, 2, 3, 4, 5)]
        if bad or not v:
            raise ValueError(f"severities must be within 1..5 (got {v})")
        return v


class Config(_Strict):
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N")
    out_dir: Path = Path("outputs")
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads; null = torch's default.")
    data: DataConfig
    teacher: TrainConfig = Field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    generations: list[GenerationConfig] = Field(default_factory=list)
    evaluate: RobustnessConfig = Field(default_factory=RobustnessConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def root(self) -> Path:
        """The folder of params.yaml: manifests store image paths relative to it, so outputs are portable."""
        return self._root

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {v!r})")
        return v

    @model_validator(mode="after")
    def _chain(self) -> "Config":
        prev = "g0"
        seen = set()
        for i, g in enumerate(self.generations):
            if g.name in seen or g.name == "g0":
                raise ValueError(f"generations[{i}].name = {g.name!r} is used twice (g0 is the teacher)")
            if g.teacher != prev:
                raise ValueError(f"generations[{i}].teacher = {g.teacher!r} must be the previous generation {prev!r}")
            seen.add(g.name)
            prev = g.name
        return self

    # ---- derived paths: one place that knows the output layout -------------------------------------
    def gen_dir(self, name: str) -> Path:
        return self.out_dir / name

    def model_dir(self, name: str) -> Path:
        """`outputs/gN/model` for every generation (g0 = the teacher): one path pattern, so dvc.yaml's foreach can
        name a generation's teacher weights as `outputs/${item.teacher}/model/...`."""
        return self.gen_dir(name) / "model"

    def generation(self, name: str) -> GenerationConfig:
        for g in self.generations:
            if g.name == name:
                return g
        raise ConfigError(f"generation {name!r} is not in params.yaml generations ({[g.name for g in self.generations]})")

    def train_config(self, name: str) -> TrainConfig:
        return self.teacher if name == "g0" else self.generation(name).student

    def section_hash(self, *keys: str) -> str:
        """Hash of the named top-level sections (or of everything), for cache keys and checkpoint sidecars."""
        d = self.model_dump(mode="json")
        part = {k: d[k] for k in keys} if keys else d
        return text_sha256(json.dumps(part, sort_keys=True))[:16]


# ---- loading ---------------------------------------------------------------------------------------

def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = d
    for i, k in enumerate(keys[:-1]):
        if isinstance(cur, list):
            cur = cur[int(k)]
        else:
            cur = cur.setdefault(k, {})
    last = keys[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) or a dict of dotted keys."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override {it!r}: expected key=value (e.g. teacher.epochs=5)")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _format_errors(source: str, err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key (value {e.get('input')!r})")
        elif e["type"] == "missing":
            lines.append(f"{source}: {loc}: required field is missing")
        elif loc == "(root)":
            lines.append(f"{source}: {msg}")
        else:
            lines.append(f"{source}: {loc} = {e.get('input')!r}: {msg}")
    return "\n".join(lines)


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        return p if p.is_absolute() else (base / p).resolve()

    cfg._root = base.resolve()
    cfg.out_dir = fix(cfg.out_dir)
    for f in ("labeled", "unlabeled", "test", "val", "unlabeled_truth"):
        setattr(cfg.data, f, fix(getattr(cfg.data, f)))
    return cfg


def config_from_dict(raw: dict, source: str = "params.yaml", base: Path | None = None, check_models: bool = True) -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, raw)) from None
    cfg = _resolve_paths(cfg, base or Path.cwd())
    if check_models:
        check_model_sizes(cfg, source)
    return cfg


def load_config(path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None,
                check_models: bool = True) -> Config:
    """Load, override and validate `params.yaml`; paths inside resolve relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for k, v in parse_overrides(overrides).items():
        try:
            _set_dotted(raw, k, v)
        except (IndexError, ValueError, TypeError, AttributeError):
            raise ConfigError(f"{path}: override {k}={v!r}: no such key") from None
    return config_from_dict(raw, str(path), path.resolve().parent, check_models)


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
            raise ConfigError(f"{source}: {field} = {tc.model!r}: unknown model (not in timm's registry)") from None
    prev_field, prev = "teacher.model", counts["teacher.model"]
    for i, g in enumerate(cfg.generations):
        field = f"generations[{i}].student.model"
        if counts[field] < prev and not g.allow_smaller:
            raise ConfigError(
                f"{source}: {field} = {g.student.model!r}: student has {counts[field]:,} parameters, fewer than its "
                f"teacher {prev_field} ({prev:,}); use an equal-or-larger student or set generations[{i}].allow_smaller: true"
            )
        prev_field, prev = field, counts[field]


def portable_dump(cfg: Config) -> dict:
    """`cfg.model_dump(mode="json")` with paths inside the project relative to params.yaml's folder (as written in
    params.yaml), so the files that record a config are the same bytes in every clone of the project."""
    d = cfg.model_dump(mode="json")

    def rel(p: str | None) -> str | None:
        if p is None:
            return None
        try:
            return Path(p).relative_to(cfg.root).as_posix()
        except ValueError:
            return p  # outside the project: keep it absolute

    d["out_dir"] = rel(d["out_dir"])
    for f in ("labeled", "unlabeled", "test", "val", "unlabeled_truth"):
        d["data"][f] = rel(d["data"][f])
    return d


def write_effective_config(cfg: Config, out_dir: Path, stage: str, extra: dict | None = None) -> Path:
    """The effective config next to a stage's outputs (timm-style), so every result explains itself."""
    from nst.io import atomic_write_json

    config = portable_dump(cfg)
    body = {"stage": stage, "config": config, "config_hash": text_sha256(json.dumps(config, sort_keys=True))[:16]}
    if extra:
        body.update(extra)
    return atomic_write_json(Path(out_dir) / "config.json", body)
