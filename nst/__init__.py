"""Noisy Student Training as a reproducible pipeline (Xie et al., CVPR 2020).

The library: config, data, the training loop, checkpoints, label store, metrics, tracking. It imports nothing of
`tasks/`, `flows/` or `cli/`, and importing it changes no process-wide state."""

__version__ = "0.2.0"
