"""distill: specialist-ensemble knowledge distillation (Hinton, Vinyals & Dean 2015, section 5) on Ray.

`pipeline` holds orchestration and shared machinery (config, CLI, storage, data shards, models, Ray
stage runners, losses, soft-target caches, tuning, reporting); `specialists` holds the paper's
section 5 as plain torch/numpy.
"""

__version__ = "0.1.0"
