"""The `nst` command: parses arguments, runs a stage, the pipeline (Prefect flow or direct) or a tool, and turns
every expected failure into one `error:` line and an exit code. The top of the import graph: nothing imports it."""
