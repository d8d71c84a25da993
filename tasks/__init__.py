"""Stages: each stage's logic lives in one function here, next to its one declaration (`tasks.spec.Stage`), and
the pipeline's order is declared once (`tasks.pipeline.steps`). The CLI, `dvc.yaml` and the Prefect flow all
run these; each takes the validated config plus the generation it works on and returns a JSON-able dict."""
