"""The specialist ensemble of Hinton, Vinyals & Dean (2015, section 5) as plain numpy/torch.

Nothing here imports Ray: `pipeline/` runs these pieces on a cluster, tests run them directly.

* `clustering`: covariance of the generalist's predictions (streamed) and on-line k-means over its
  columns -> one class subset per specialist (§5.3).
* `dustbin`: a specialist's labels (its subset + one dustbin class), half/half batches, and the
  logit correction for that oversampling (§5.2).
* `combine`: the distribution over all classes that best agrees with the generalist and the active
  specialists (§5.4), by an MM fixed-point iteration or by the paper's gradient descent.
"""
from specialists.clustering import (
    CovarianceAccumulator, adjusted_rand, class_points, cluster_classes, subsets_to_labels,
)
from specialists.combine import (
    SubsetIndex, active_mask, combine, combine_fixed_point, combine_gradient_descent, objective,
)
from specialists.dustbin import (
    DustbinMapper, HalfSubsetSampler, apply_correction, dustbin_correction, half_subset_batches,
    subset_fraction,
)

__all__ = [
    "CovarianceAccumulator", "adjusted_rand", "class_points", "cluster_classes", "subsets_to_labels",
    "SubsetIndex", "active_mask", "combine", "combine_fixed_point", "combine_gradient_descent", "objective",
    "DustbinMapper", "HalfSubsetSampler", "apply_correction", "dustbin_correction", "half_subset_batches",
    "subset_fraction",
]
