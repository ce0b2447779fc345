"""A built-in Madelon-style classification problem: deterministic from a seed, no download.

Like Guyon's Madelon generator: each class owns clusters placed on vertices of a
hypercube in an informative subspace; points are Gaussian around them; half of the
informative features are replaced by random linear mixtures of the others (redundant);
the rest of the features are pure noise. Then the columns are shuffled. It is
non-linear (several clusters per class) and most features are useless, which is what
sparse input layers are good at.
"""

from __future__ import annotations

import numpy as np


def make_madelon(n_samples: int, n_features: int, n_informative: int, n_classes: int, noise: float,
                 seed: int, clusters_per_class: int = 2, class_sep: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(X (n_samples, n_features) float32, y (n_samples,) int32), balanced classes.

    The first ``n_samples`` rows of a larger call with the same other arguments are not
    the same samples; generate train and test together and split.
    """
    rng = np.random.default_rng([seed, 0x3ADE])
    n_clusters = n_classes * clusters_per_class
    n_base = max(1, n_informative - n_informative // 2)
    # distinct hypercube vertices as cluster centres in the base subspace
    n_vertices = 2 ** min(n_base, 30)
    bits = rng.choice(n_vertices, n_clusters, replace=n_clusters > n_vertices)
    centres = ((bits[:, None] >> np.arange(n_base)) & 1).astype(np.float64) * 2 - 1
    centres *= class_sep
    y = np.arange(n_samples) % n_classes
    cluster = y * clusters_per_class + rng.integers(0, clusters_per_class, n_samples)
    base = centres[cluster] + rng.standard_normal((n_samples, n_base)) * (1.0 + noise)
    mix = rng.uniform(-1, 1, (n_base, n_informative - n_base))
    informative = np.concatenate([base, base @ mix], axis=1)
    x = rng.standard_normal((n_samples, n_features))
    x[:, :n_informative] = informative
    x = x[:, rng.permutation(n_features)]
    order = rng.permutation(n_samples)
    return x[order].astype(np.float32), y[order].astype(np.int32)
