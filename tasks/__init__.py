"""Stage functions: each stage's logic lives in exactly one function here, called alike by the CLI, the Prefect
flow, `dvc.yaml` (through the CLI) and the tests. Each takes the validated config (which knows the output layout)
plus the generation/shard it works on, and returns a JSON-able dict of output paths and metrics."""

from tasks.evaluate import evaluate
from tasks.filter_balance import balance, filter_balance
from tasks.prepare import prepare
from tasks.pseudo_label import finish_pseudo_label, num_shards, pseudo_label, pseudo_label_shard
from tasks.train import train_student, train_teacher

__all__ = ["prepare", "train_teacher", "pseudo_label", "pseudo_label_shard", "finish_pseudo_label", "num_shards",
           "filter_balance", "balance", "train_student", "evaluate"]
