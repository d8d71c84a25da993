"""Stage `builtin-data`: a built-in set, asked for by name (`data.builtin`), generated into its own folder
(data/<name>) - never into a folder that holds anything it did not make (nst.datasets checks a marker)."""

from __future__ import annotations

from nst.config import Config
from nst.errors import DataError
from tasks.spec import CORE, Stage


def make_builtin(cfg: Config, gen: str = "", fingerprint: str = "") -> dict:
    """Generate the built-in set named by `data.builtin` into its own folder (data/<name>), never elsewhere."""
    from nst.datasets import make_digits, make_toy

    out = cfg.builtin_dir()
    if out is None:
        raise DataError("data.builtin is not set: there is no built-in set to generate")
    if cfg.data.builtin == "toy":
        make_toy(out, seed=0)  # the dataset seed is fixed; `seed` drives training
    else:
        make_digits(out, labels_per_class=int(cfg.data.builtin.split("-")[1]), seed=cfg.seed)
    return {"path": cfg.rel(out)}


DATA = Stage(
    name="builtin-data", fn=make_builtin, scope="project",
    params=lambda c, g: ["data.builtin"] + (["seed"] if (c.data.builtin or "").startswith("digits") else []),
    deps=lambda c, g: [],
    outs=lambda c, g: [c.builtin_dir()],
    code=CORE + ("nst/datasets.py", "tasks/builtin_data.py"),
)
