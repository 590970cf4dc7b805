"""One module per pipeline stage, each with `fingerprint(cfg) -> str` and `run(cfg) -> dict`.

The runner (`pipeline.runner`) skips a stage whose marker holds the same fingerprint, and writes the
marker last, after the stage's own files. Stage modules import Ray lazily so `distill config show`
stays instant.
"""
