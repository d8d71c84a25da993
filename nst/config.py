"""One pydantic tree for `params.yaml`: DVC reads the same file, every stage gets a validated slice of it.

Invalid input fails here, before any compute, with one line per problem naming file, field and value.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from nst.errors import ConfigError, quote
from nst.io import text_sha256
from nst.secrets import redact_tree

__all__ = ["Config", "ConfigError", "load_config", "portable_dump", "config_hash", "SPLITS"]

SPLITS = ("labeled", "unlabeled", "val", "test", "unlabeled_truth")
BUILTIN = re.compile(r"toy|digits-([1-9]\d?)")
GEN = re.compile(r"g(0|[1-9]\d{0,3})")  # g0 ... g9999: names stay short, indices stay small
FT = "-ft"  # the fine-tuned model's name is its base model's + FT: g2 -> g2-ft


def model_order(name: str) -> tuple[int, int]:
    """Sort key of model names: g0, g1, g2, g2-ft, g3 (a fine-tune right after its base model)."""
    return int(name.removesuffix(FT)[1:]), int(name.endswith(FT))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _model_name(v: str) -> str:
    if ":" in v or "/" in v:
        raise ValueError("only model names registered in timm are accepted (no hf-hub:, local-dir: or paths; "
                         "use pretrained_file for local weights)")
    return v


def _source(v: Any) -> Any:
    """A data source: a local path, or an `s3://bucket/prefix` of image shards (kept as text: a Path would fold
    the `//`)."""
    if isinstance(v, str) and v.startswith("s3://"):
        from nst.s3 import parse_s3_uri

        try:
            parse_s3_uri(v.split("{", 1)[0])
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v
    return Path(v) if isinstance(v, str) else v  # anything else: pydantic's own error for a path


Source = Annotated[Path | str | None, BeforeValidator(_source)]


class DataConfig(_Strict):
    """Image sources: an ImageFolder directory (class sub-folders) or a CSV/Parquet manifest `path,label`, or a
    built-in set asked for by name (generated into its own folder, data/<name>)."""

    builtin: str | None = Field(None, description="toy | digits-K: generate this built-in set into data/<name>; "
                                                  "leave the paths below unset.")
    labeled: Source = Field(None, description="ImageFolder, CSV/Parquet manifest, or image shards: a folder of .tar "
                                               "files, a brace pattern, or s3://bucket/prefix/ (nst/shards.py).")
    unlabeled: Source = None
    test: Source = None
    val: Source = None
    unlabeled_truth: Path | None = Field(
        None, description="Optional manifest with the hidden labels of the unlabeled set; only for reporting pseudo-label accuracy."
    )
    image_size: int = Field(32, ge=8, le=1024)
    classes: list[str] | None = Field(None, description="Class names; null = the labeled source's sorted folder names / labels.")
    transform: Literal["pad_crop", "rrc"] = Field(
        "pad_crop", description="pad_crop: resize to image_size, pad-and-crop (small images); rrc: timm's "
                                "RandomResizedCrop for training, resize + centre crop (crop_pct) for evaluation (photos).")
    rrc_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range (transform: rrc).")
    crop_pct: float = Field(0.875, gt=0.0, le=1.0, description="Evaluation/labelling centre crop (transform: rrc).")
    hflip: bool = Field(False, description="Horizontal flips in training (off for digits and text-like images).")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="Unreadable images are skipped and listed up to this fraction of a split.")
    max_image_pixels: int = Field(89_478_485, ge=1, description="Images larger than this (from the header, before "
                                                                "decoding) are rejected as decompression bombs.")
    verify: Literal["header", "decode"] = Field("header", description="prepare checks each image's header (fast) or "
                                                                      "fully decodes it.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes (decode + augment).")
    prepare_workers: int | None = Field(None, ge=1, le=256, description="Processes checking images in prepare; null = CPU count (max 8).")
    cache_mb: int = Field(512, ge=0, description="Decoded images of a split are kept in RAM when they fit in this many MB.")
    cache_dir: Path | None = Field(None, description="Local cache of shards read from S3; null = <out_dir>/.nst/shard-cache.")
    cache_limit_mb: float = Field(10240, gt=0, description="The shard cache's size limit (least recently used shards go first).")

    @field_validator("builtin")
    @classmethod
    def _builtin(cls, v: str | None) -> str | None:
        if v is not None and not BUILTIN.fullmatch(v):
            raise ValueError("must be 'toy' or 'digits-K' (K labels per class, 1-99)")
        return v

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError("needs at least 2 distinct class names")
        return v

    @field_validator("rrc_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("must be [min, max] with 0 < min <= max <= 1")
        return v

    @property
    def scan_workers(self) -> int:
        """Processes that check and hash images: prepare's scan, and the fingerprint of an image folder."""
        return self.prepare_workers or min(8, os.cpu_count() or 1)

    @model_validator(mode="after")
    def _sources(self) -> "DataConfig":
        if self.builtin is not None:
            given = [f for f in SPLITS if getattr(self, f) is not None]
            if given:
                raise ValueError(f"data.{given[0]} is set together with data.builtin = {self.builtin!r}: a built-in "
                                 f"set lives in data/{self.builtin}; unset the paths or data.builtin")
        else:
            missing = [f for f in ("labeled", "unlabeled", "test") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"data.{missing[0]} is required (or set data.builtin: toy | digits-K)")
        return self


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

    def describe(self) -> str:
        """The effective noise in one line (printed when training starts, so a config's meaning is visible)."""
        ra = f"RandAugment N {self.randaugment_n} M {self.randaugment_m:g}" if self.randaugment_n else "RandAugment off"
        ra += f" (mstd {self.randaugment_mstd:g})" if self.randaugment_n and self.randaugment_mstd else ""
        return f"{ra}, dropout {self.dropout:g}, stochastic depth {self.drop_path:g}"


NOISE_OFF = {"randaugment_n": 0, "dropout": 0.0, "drop_path": 0.0}


class TrainConfig(_Strict):
    model: str = Field("nst_cnn_s", description="A model registered in timm (ours, nst_cnn_*, included).")
    pretrained: bool = Field(False, description="Start from timm's pretrained weights (needs the machine's hub access).")
    pretrained_file: Path | None = Field(None, description="Start from a local safetensors/timm checkpoint; the "
                                                           "classifier is re-initialised for our classes.")
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
    noise: NoiseConfig = Field(default_factory=lambda: NoiseConfig(**NOISE_OFF),
                               description="Teacher default: no noise; fields not spelled out keep that default.")
    amp: Literal["auto"] | bool = Field(
        "auto", description="bf16 autocast in training, evaluation and labelling. true: on every device (on CPU "
                            "through oneDNN's bf16 kernels: native on CPUs with AMX/AVX512-BF16, emulated "
                            "elsewhere); false: fp32 everywhere; auto: bf16 on CUDA, fp32 on CPU.")
    channels_last: bool = Field(True, description="channels_last (NHWC) memory format, on CUDA and on CPU (oneDNN).")
    compile: bool = Field(False, description="torch.compile (inductor) the training step on every device: Triton "
                                             "kernels on CUDA, C++ through the system compiler on CPU; slower start "
                                             "(tens of seconds), faster steps.")

    # Defaults of the noise fields a config does not spell out: the role's own, field by field (ClassVar: not a field).
    noise_defaults: ClassVar[dict[str, Any]] = NOISE_OFF

    @field_validator("model")
    @classmethod
    def _registered_name(cls, v: str) -> str:
        return _model_name(v)

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_value(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError("expected true, false or auto")

    @field_validator("noise", mode="before")
    @classmethod
    def _role_noise_defaults(cls, v: Any) -> Any:
        return {**cls.noise_defaults, **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs = {self.warmup_epochs} must be < epochs = {self.epochs}")
        if self.pretrained and self.pretrained_file is not None:
            raise ValueError("set pretrained or pretrained_file, not both")
        return self


class StudentConfig(TrainConfig):
    """A student's training config: the same fields as the teacher's, but the paper's noise is the default, field
    by field, so a student block that spells only `model:` or `epochs:` is still noised (the method, not the
    ablation). Turning all noise off is allowed and warned about at training time."""

    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Student default: the paper's noise; "
                                                                         "fields not spelled out keep it.")
    noise_defaults: ClassVar[dict[str, Any]] = {}


class PseudoLabelConfig(_Strict):
    mode: Literal["soft", "hard"] = "soft"
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Soft labels = softmax(logits / T); the paper uses T = 1.")
    top_k: int = Field(5, ge=1, le=1000, description="Soft labels keep the top-k classes, renormalised.")
    batch_size: int = Field(256, ge=1, le=65_536)
    shard_size: int = Field(1000, ge=1, description="Unlabeled images per Parquet shard (one labelling task each).")
    gpu_decode: bool = Field(True, description="On CUDA, decode JPEGs on the GPU (nvjpeg) in batches.")


class FilterConfig(_Strict):
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="Drop pseudo-labels whose max probability is below this (paper: 0.3).")
    target_per_class: int | None = Field(
        None, ge=1, description="K images per predicted class; null = kept images / number of classes (the balanced set keeps its size)."
    )
    duplicate: bool = Field(True, description="Duplicate (seeded) images of classes with fewer than K.")


class GenerationConfig(_Strict):
    """One noisy-student generation. `teacher` names the previous generation explicitly."""

    name: str
    teacher: str
    student: StudentConfig = Field(default_factory=StudentConfig)
    ratio: float = Field(3.0, gt=0.0, le=1000.0, description="Unlabeled:labeled batch ratio (paper: 1 for B0, 3 for larger).")
    init: Literal["scratch", "teacher"] = Field("scratch", description="Student init; from scratch is often better (paper finding #8).")
    allow_smaller: bool = Field(False, description="Permit a student with fewer parameters than its teacher.")

    @field_validator("name", "teacher")
    @classmethod
    def _gen_name(cls, v: str) -> str:
        if not GEN.fullmatch(v):
            raise ValueError("must look like g1, g2, ... (g followed by at most 4 digits, no leading zero)")
        return v

    @property
    def index(self) -> int:
        return int(self.name[1:])


class RobustnessConfig(_Strict):
    """The robustness suite of `evaluate` (corruptions, perturbation stability, adversarial)."""

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


class DistributedConfig(_Strict):
    """Data-parallel training: `nst train-*` puts `torchrun --nproc-per-node N` in front of itself when N > 1; on
    several nodes each node runs one torchrun agent, started by the flow on Dask or by the cluster's own launcher
    (a PyTorchJob, `srun`: docker/pytorchjob.yaml, docker/slurm-train.sh)."""

    nproc_per_node: int | Literal["auto"] = Field(1, description="Processes (GPUs) per training stage; auto = the "
                                                                 "visible GPUs (1 without CUDA).")
    nnodes: int = Field(1, ge=1, le=1024, description="Machines a training stage spans, one torchrun agent each. "
                                                      "The fingerprint records the world size only: 2 nodes x 1 "
                                                      "process is the same computation as 1 node x 2.")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the c10d rendezvous (nnodes > 1); null = the "
                                                        "first node's host and a free port there (the flow on Dask).")
    rdzv_timeout_s: float = Field(300.0, gt=0, le=86400, description="How long the nodes may take to join (and the "
                                                                     "flow to find workers for them) before the stage "
                                                                     "fails; across nodes also how long a rank waits "
                                                                     "for its peers at a collective (at least 60 s).")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU.")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.\-]+):\d{1,5}", v):
            raise ValueError("expected HOST:PORT")
        return v

    @property
    def peer_timeout_s(self) -> float | None:
        """Across nodes, how long a rank waits for its peers (see nst.distributed.setup); on one node torchrun
        itself stops the others when one fails, and torch's default stands."""
        return max(60.0, self.rdzv_timeout_s) if self.nnodes > 1 else None

    @property
    def world_size(self) -> int | str:
        """Training processes in all: what decides the computation (a number, or `<nnodes>xauto`)."""
        if isinstance(self.nproc_per_node, int):
            return self.nnodes * self.nproc_per_node
        return f"{self.nnodes}xauto"

    @field_validator("nproc_per_node")
    @classmethod
    def _n(cls, v):
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("must be 1..64 or 'auto'")
        return v


class TrackingConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="null = MLFLOW_TRACKING_URI or a local SQLite file in out_dir.")
    experiment: str = Field("noisy-student", min_length=1, max_length=200)
    registered_model: str = Field("noisy-student", min_length=1, max_length=200)
    live: bool = Field(True, description="Log per-epoch metrics from the training process while it trains.")


class EvaluateConfig(_Strict):
    image_size: int | None = Field(None, ge=8, le=1024, description="Also evaluate every model at this test "
                                   "resolution (FixRes: the train/test resolution discrepancy); null = each model "
                                   "at its own training resolution only.")


class FreezeConfig(_Strict):
    """What the fine-tune keeps fixed: parameters, and BatchNorm in inference mode (running statistics untouched).
    By timm's structure (the model's group_matcher: stem, then blocks or stages) and/or by name."""

    blocks: int | None = Field(None, ge=0, description="The stem and the first N blocks (timm's fine-grained "
                                                        "group_matcher; the official code's --fix_layer_num N).")
    stages: int | None = Field(None, ge=0, description="The stem and the first N stages (the coarse group_matcher).")
    patterns: list[str] = Field(default_factory=list, description="Module or parameter names, fnmatch globs "
                                                                  "('blocks.0', '*.attn.qkv', '*fc1*').")

    @model_validator(mode="after")
    def _one_count(self) -> "FreezeConfig":
        if self.blocks is not None and self.stages is not None:
            raise ValueError("set freeze.blocks or freeze.stages, not both")
        return self


class FinetuneConfig(_Strict):
    """The paper's last step (FixRes): fine-tune one model at the test resolution on unaugmented labeled images,
    shallow layers fixed; the result is the model `<generation>-ft`, evaluated like the others."""

    enabled: bool = False
    generation: str | None = Field(None, description="The model to fine-tune (its EMA weights); null = the last.")
    image_size: int | None = Field(None, ge=8, le=1024, description="null = evaluate.image_size.")
    epochs: float = Field(1.5, gt=0.0, le=10_000, description="Passes over the labeled set; a fraction counts steps.")
    lr: float | None = Field(None, gt=0.0, le=10.0, description="null = the last steps of the model's own schedule "
                                                                "(official --train_last_step_num); else a cosine "
                                                                "from lr over the fine-tune's steps.")
    batch_size: int | None = Field(None, ge=1, le=65_536, description="null = the model's own batch size.")
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(stages=1))

    @field_validator("generation")
    @classmethod
    def _gen_name(cls, v: str | None) -> str | None:
        if v is not None and not GEN.fullmatch(v):
            raise ValueError("must be g0, g1, g2, ... (a model of the pipeline)")
        return v


class Config(_Strict):
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N")
    out_dir: Path = Path("outputs")
    threads: int | None = Field(None, ge=1, le=1024,
                                description="torch CPU threads of a stage on one machine, shared by torchrun's "
                                            "processes there (threads // nproc_per_node each); null = torch's default.")
    data: DataConfig
    teacher: TrainConfig = Field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    generations: list[GenerationConfig] = Field(default_factory=list)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def root(self) -> Path:
        """The folder of params.yaml: manifests store image paths relative to it, so outputs are portable."""
        return self._root

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?|mps", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _chain(self) -> "Config":
        prev, prev_model = "g0", self.teacher.model
        seen = set()
        for i, g in enumerate(self.generations):
            if g.name in seen or g.name == "g0":
                raise ValueError(f"generations[{i}].name = {g.name!r} is used twice (g0 is the teacher)")
            if g.teacher != prev:
                raise ValueError(f"generations[{i}].teacher = {g.teacher!r} must be the previous generation {prev!r}")
            if g.init == "teacher" and g.student.model != prev_model:
                raise ValueError(f"generations[{i}].init = 'teacher' needs the teacher's architecture "
                                 f"{prev_model!r} (student is {g.student.model!r}); use init: scratch")
            seen.add(g.name)
            prev, prev_model = g.name, g.student.model
        return self

    @model_validator(mode="after")
    def _finetune(self) -> "Config":
        ft = self.finetune
        if not ft.enabled:
            return self
        if ft.generation is not None and ft.generation not in self.model_names():
            raise ValueError(f"finetune.generation = {quote(ft.generation)}: not a model of this pipeline "
                             f"({', '.join(self.model_names())})")
        if ft.image_size is None and self.evaluate.image_size is None:
            raise ValueError("finetune.enabled needs a resolution: set finetune.image_size or evaluate.image_size")
        return self

    # ---- derived names and paths: the one place that knows the output layout --------------------------------
    def model_names(self) -> list[str]:
        """The models of the generations: the teacher g0 and its students; each is trained and labels once."""
        return ["g0"] + [g.name for g in self.generations]

    def finetuned(self) -> str | None:
        """The model the fine-tune starts from (finetune.generation, default the last one); None when it is off."""
        return (self.finetune.generation or self.model_names()[-1]) if self.finetune.enabled else None

    def finetune_name(self) -> str | None:
        base = self.finetuned()
        return base + FT if base else None

    def evaluated_models(self) -> list[str]:
        """Every model that is evaluated and tracked, in pipeline order: the generations, then the fine-tune."""
        return sorted(self.model_names() + ([self.finetune_name()] if self.finetune.enabled else []), key=model_order)

    def role(self, name: str) -> str:
        return "finetune" if name.endswith(FT) else "teacher" if name == "g0" else "student"

    def made_from(self, name: str) -> str | None:
        """The model `name` learns from: a student's teacher, a fine-tune's base model; None for the g0 teacher."""
        if name.endswith(FT):
            return name.removesuffix(FT)
        return None if name == "g0" else self.generation(name).teacher

    def finetune_size(self) -> int | None:
        return self.finetune.image_size or self.evaluate.image_size

    def generation(self, name: str) -> GenerationConfig:
        for g in self.generations:
            if g.name == name:
                return g
        raise ConfigError(f"generation {quote(name, 80)} is not in params.yaml generations ({[g.name for g in self.generations]})")

    def gen_index(self, name: str) -> int:
        """Position in the `generations` list (what DVC's `generations.<i>` params key addresses)."""
        return [g.name for g in self.generations].index(self.generation(name).name)

    def train_config(self, name: str) -> TrainConfig:
        """A model's training settings; a fine-tune's are its base model's (finetune.* come on top)."""
        name = name.removesuffix(FT)
        if name == "g0":
            return self.teacher
        return self.generation(name).student

    def builtin_dir(self) -> Path | None:
        b = self.data.builtin
        if b is None:
            return None
        return self.root / "data" / (b if b == "toy" else f"{b}-seed{self.seed}")

    @property
    def state_dir(self) -> Path:
        """Bookkeeping that is not an output: locks, caches, tracking state."""
        return self.out_dir / ".nst"

    @property
    def shard_cache_dir(self) -> Path:
        return self.data.cache_dir or self.state_dir / "shard-cache"

    @property
    def data_dir(self) -> Path:
        return self.out_dir / "data"

    def gen_dir(self, name: str) -> Path:
        return self.out_dir / name

    def model_dir(self, name: str) -> Path:
        return self.gen_dir(name) / "model"

    def eval_dir(self, name: str) -> Path:
        return self.gen_dir(name) / "eval"

    def labels_dir(self, name: str) -> Path:
        """The pseudo-labels model `name` made (read by the next generation's filter-balance)."""
        return self.gen_dir(name) / "labels"

    def balanced_dir(self, name: str) -> Path:
        return self.gen_dir(name) / "balanced"

    def rel(self, p: Path) -> str:
        """A path as params.yaml would spell it: relative to its folder when inside it."""
        try:
            return Path(p).relative_to(self.root).as_posix()
        except ValueError:
            return str(p)


# ---- loading ---------------------------------------------------------------------------------------

# A config is small: these bounds are far above any real one and far below what exhausts memory or the stack.
YAML_MAX_BYTES = 4 << 20        # a file
YAML_MAX_DEPTH = 64             # nested mappings/lists
YAML_MAX_NODES = 100_000        # values after alias expansion (a 1 KB "billion laughs" expands to 10^9)


class _YamlRefused(Exception):
    """A document the loader refuses (too deep, aliases expanding too far, a key given twice)."""


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what silently goes wrong: a key given twice (the last would win), nesting deep
    enough to exhaust the stack, aliases whose expansion would exhaust memory, recursive aliases."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                raise _YamlRefused(f"nested deeper than {YAML_MAX_DEPTH} levels (line {self.peek_event().start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise _YamlRefused(f"key {quote(key, 60)} given twice in one mapping "
                                       f"(line {key_node.start_mark.line + 1}); the first would be silently replaced")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes after alias expansion, counted over the shared graph (memoised, so a bomb costs its own size)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            kids = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else []
            sizes[nid] = min(YAML_MAX_NODES + 1, 1 + sum(sizes[id(k)] for k in kids))
            active.discard(nid)
            continue
        if nid in sizes:
            continue
        if nid in active:
            raise _YamlRefused(f"a recursive alias (line {node.start_mark.line + 1})")
        active.add(nid)
        stack.append((node, True))
        kids = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else []
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document through the bounded loader; any problem is one ConfigError line naming `source`."""
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters; a config file is at most {YAML_MAX_BYTES:,}")
    loader = None
    try:
        loader = _SafeLoader(text)  # the reader already checks characters
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > YAML_MAX_NODES:
            raise _YamlRefused(f"aliases expand to more than {YAML_MAX_NODES:,} values (an alias bomb?)")
        return loader.construct_document(node)
    except _YamlRefused as e:
        raise ConfigError(f"{source}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({quote(str(e).splitlines()[0], 160)[1:-1]})") from None
    except RecursionError:
        raise ConfigError(f"{source}: refused: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file as text (UTF-8) through `parse_yaml`: a missing, binary or malformed file is one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        if path.stat().st_size > YAML_MAX_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a {what} is at most {YAML_MAX_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start})") from None
    return parse_yaml(text, str(path))

def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = d
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
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
            raise ConfigError(f"override {quote(it)}: expected key=value (e.g. teacher.epochs=5)")
        k, v = it.split("=", 1)
        out[k.strip()] = parse_yaml(v, f"override {quote(it, 80)}: value")
    return out


def override_args(overrides: dict[str, Any] | None) -> list[str]:
    """The inverse of `parse_overrides`: `-S` strings a child `nst` command parses back to the same values."""
    return [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]


def _key_text(key: str) -> str:
    """A key as a message shows it: as typed when plain, quoted when it holds line breaks or other controls (a
    message stays one line) or is very long."""
    return key if key.isprintable() and len(key) <= 120 else quote(key, 120)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = _key_text(".".join(str(p) for p in e["loc"]) or "(root)")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key (value {quote(e.get('input'))})")
        elif e["type"] == "missing":
            lines.append(f"{source}: {loc}: required field is missing")
        elif loc in ("(root)", "data"):
            lines.append(f"{source}: {msg}")
        else:
            lines.append(f"{source}: {loc} = {quote(e.get('input'))}: {msg}")
    return "\n".join(lines)


def _resolve_paths(cfg: Config, base: Path, source: str) -> Config:
    def fix(p: Path | str | None) -> Path | str | None:
        if p is None or isinstance(p, str):  # None, or an s3:// source
            return p
        return p if p.is_absolute() else (base / p).resolve()

    cfg._root = base.resolve()
    cfg.out_dir = fix(cfg.out_dir)
    if cfg.out_dir.exists() and not cfg.out_dir.is_dir():
        raise ConfigError(f"{source}: out_dir = {quote(cfg.rel(cfg.out_dir))}: exists and is not a folder")
    bdir = cfg.builtin_dir()
    if bdir is not None:
        layout = {"labeled": "labeled", "unlabeled": "unlabeled", "test": "test",
                  "unlabeled_truth": "unlabeled_truth.csv"} | ({"val": "val"} if cfg.data.builtin == "toy" else {})
        for f, sub in layout.items():
            object.__setattr__(cfg.data, f, bdir / sub)  # derived, not user input: skips re-validation
    else:
        for f in SPLITS:
            setattr(cfg.data, f, fix(getattr(cfg.data, f)))
    if cfg.data.cache_dir is not None:
        cfg.data.cache_dir = fix(cfg.data.cache_dir)
    for tc in [cfg.teacher] + [g.student for g in cfg.generations]:
        if tc.pretrained_file is not None:
            tc.pretrained_file = fix(tc.pretrained_file)
    _check_out_dir_apart(cfg, source)
    return cfg


def _check_out_dir_apart(cfg: Config, source: str) -> None:
    """Stages write and clean up inside out_dir: one that holds a data source (or lies inside one) would overwrite
    or delete the user's data, so it is refused before anything is written."""
    out = Path(os.path.realpath(cfg.out_dir))
    for split in SPLITS:
        src = getattr(cfg.data, split)
        if src is None or isinstance(src, str):  # s3:// sources are not under out_dir
            continue
        real = Path(os.path.realpath(src))
        if real == out or out in real.parents or real in out.parents:
            where = "contains" if real != out and out in real.parents else \
                "is" if real == out else "lies inside"
            raise ConfigError(f"{source}: out_dir = {quote(cfg.rel(cfg.out_dir))} {where} data.{split} = "
                              f"{quote(cfg.rel(src))}: outputs would overwrite the data; choose an out_dir apart "
                              "from every data source")


def config_from_dict(raw: dict, source: str = "params.yaml", base: Path | None = None, check_models: bool = True) -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None
    cfg = _resolve_paths(cfg, base or Path.cwd(), source)
    if check_models:
        from nst.validate import check_batch_split, check_finetune, check_model_sizes  # meta-device models: torch

        check_model_sizes(cfg, source)
        check_batch_split(cfg, source)
        check_finetune(cfg, source)
    return cfg


def load_config(path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None,
                check_models: bool = True) -> Config:
    """Load, override and validate `params.yaml`; paths inside resolve relative to its folder."""
    path = Path(path)
    return config_from_dict(raw_config(path, overrides), str(path), path.resolve().parent, check_models)


def _unshared(v: Any) -> Any:
    """A copy of a YAML tree in which no two places share a dict or list: a YAML alias (`*id001`) and an override
    value are one object where they are used, so setting a key in one place would silently set it in the other
    (another generation, the caller's overrides)."""
    if isinstance(v, dict):
        return {k: _unshared(x) for k, x in v.items()}
    return [_unshared(x) for x in v] if isinstance(v, list) else v


def raw_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> dict:
    """`params.yaml` as a dict with the overrides set, in order, not yet validated (what `load_config` validates;
    a study reads it to know how many generations an arm's run has)."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    raw = _unshared(raw)
    for k, v in parse_overrides(overrides).items():
        try:
            _set_dotted(raw, k, _unshared(v))
        except (IndexError, ValueError, TypeError, AttributeError, KeyError):
            raise ConfigError(f"{path}: override {_key_text(k)}={quote(v)}: no such key") from None
    return raw


def check_device(cfg: Config, source: str = "params.yaml") -> None:
    """`device: cuda` on a machine without CUDA fails before any compute, not after the data is prepared."""
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: device = {cfg.device!r}: CUDA is not available on this machine "
                              "(use device: auto or cpu)")
        idx = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"{source}: device = {cfg.device!r}: this machine has {torch.cuda.device_count()} GPU(s)")


def portable_dump(cfg: Config) -> dict:
    """`cfg.model_dump(mode="json")` with paths inside the project relative to params.yaml's folder and credentials
    redacted: what files that record a config contain, the same bytes in every clone of the project."""
    d = cfg.model_dump(mode="json")

    def rel(p: str | None) -> str | None:
        return None if p is None or p.startswith("s3://") else cfg.rel(Path(p))

    d["out_dir"] = rel(d["out_dir"])
    d["data"]["cache_dir"] = rel(d["data"]["cache_dir"])
    for f in SPLITS:
        d["data"][f] = rel(d["data"][f])
    for tc in [d["teacher"]] + [g["student"] for g in d["generations"]]:
        tc["pretrained_file"] = rel(tc["pretrained_file"])
    return redact_tree(d)


def config_hash(cfg: Config) -> str:
    """The one config hash (MLflow tags, effective configs): of the portable dump, so the same in every clone."""
    return text_sha256(json.dumps(portable_dump(cfg), sort_keys=True))[:16]


def value_at(d: Any, dotted: str) -> Any:
    """`value_at(dump, "generations.0.student")`: the value DVC's params key of the same name addresses."""
    cur = d
    for k in dotted.split("."):
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    return cur
