"""Our small CNN family, registered in timm's registry so `timm.create_model` builds ours and timm's alike.

A width/depth ladder (xs < s < m < l) makes "equal-or-larger student" cheap to honour on a CPU. Each
model honours timm's noise knobs: `drop_rate` (dropout before the classifier) and `drop_path_rate`
(stochastic depth, linear in depth, the last block dropping with exactly that probability, as in the paper).
"""

from __future__ import annotations

import functools

import timm
import torch
from timm.layers import DropPath
from timm.models import register_model
from torch import nn

__all__ = ["NstCNN", "param_count", "LADDER"]


class _Block(nn.Module):
    """Pre-activation-free basic residual block; the residual branch is what stochastic depth drops."""

    def __init__(self, cin: int, cout: int, stride: int, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(self.shortcut(x) + self.drop_path(y))


class NstCNN(nn.Module):
    def __init__(self, widths=(16, 32, 64), depths=(1, 1, 1), num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg", **_: object):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        n_blocks = sum(depths)
        blocks, cin, k = [], widths[0], 0
        self.stage_of: list[int] = []  # block index -> stage (timm's coarse grouping)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="stem")]
        for stage, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                k += 1
                stride = 2 if (j == 0 and stage > 0) else 1
                blocks.append(_Block(cin, w, stride, drop_path_rate * k / n_blocks))
                self.stage_of.append(stage)
                cin = w
            self.feature_info.append(dict(num_chs=w, reduction=2 ** stage, module=f"blocks.{k - 1}"))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (layer decay, freezing): the stem, then one group per block (coarse: per stage),
        the classifier last."""
        if not coarse:
            return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")
        return dict(stem=r"^stem", blocks=[(rf"^blocks\.{i}\.", (s,)) for i, s in enumerate(self.stage_of)])


# name -> (widths, depths); each rung has strictly more parameters than the one before.
LADDER = {
    "nst_cnn_xs": ((16, 32, 64), (1, 1, 1)),
    "nst_cnn_s": ((24, 48, 96), (1, 1, 1)),
    "nst_cnn_m": ((32, 64, 128), (1, 2, 2)),
    "nst_cnn_l": ((48, 96, 192), (2, 2, 2)),
}


def _make(name: str):
    widths, depths = LADDER[name]

    def fn(pretrained: bool = False, **kwargs) -> NstCNN:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return NstCNN(widths=widths, depths=depths, **kwargs)

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = f"NstCNN widths={widths} depths={depths}."
    fn.__module__ = __name__
    return fn


for _name in LADDER:
    globals()[_name] = register_model(_make(_name))


@functools.lru_cache(maxsize=None)
def param_count(model_name: str, num_classes: int) -> int:
    """Parameters of a model as built for `num_classes`; KeyError if timm does not know the name."""
    if not timm.is_model(model_name):
        raise KeyError(model_name)
    with torch.device("meta"):
        m = timm.create_model(model_name, num_classes=num_classes)
    return sum(p.numel() for p in m.parameters())
