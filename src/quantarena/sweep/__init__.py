"""Running a sweep: plan the variants, run each in a worker (quantized once, or reloaded from the checkpoint
cache), evaluate every task on it, store each result as it comes, write the report from the store. The entry
points are in ``quantarena.sweep.api``; this package's own import is cheap (the CLI starts workers from it)."""
