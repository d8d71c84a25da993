"""Noisy Student Training as a reproducible pipeline (Xie et al., CVPR 2020)."""

import os as _os

# No network but package registries: fail fast instead of hanging on hubs, and never phone home.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}.items():
    _os.environ.setdefault(_k, _v)

__version__ = "0.1.0"
