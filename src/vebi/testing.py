"""Oracles for the tests and benchmarks, kept out of the public API.

Independent implementations that the project's own code is checked against (never used by
it): :func:`lasso_homotopy_reference`, the mu-lasso of :mod:`vebi.mining.solver` read off the
exact LARS-lasso path. This module is the top layer of the package (it may import any other)
and needs the dev dependencies (scikit-learn).
"""

from __future__ import annotations

import numpy as np

__all__ = ["lasso_homotopy_reference"]


def lasso_homotopy_reference(
    gram: np.ndarray, cross: np.ndarray, mu: float, n_samples: int, nonnegative: bool = True
) -> np.ndarray:
    """An independent solver: the exact LARS-lasso path (scikit-learn), read at ||w||_1 = mu.

    The lasso path is piecewise linear and its L1 norm grows along it, so the constrained
    solution lies on the segment where ||w||_1 crosses mu (or is the path's end when the bound
    is not active). The path is followed only until it crosses mu: LARS is run for 8, 16,
    32, ... steps until its last point has ||w||_1 >= mu or the path ends (at most twice the
    steps needed). Needs scikit-learn (a dev dependency).
    """
    from sklearn.linear_model import lars_path_gram

    cross = np.asarray(cross, dtype=np.float64).reshape(len(gram), -1)
    weights = np.zeros_like(cross)
    for c in range(cross.shape[1]):
        if not np.any(cross[:, c]):
            continue
        steps, longest = 8, 10 * len(gram)
        while True:
            alphas, _, coefs = lars_path_gram(
                Xy=cross[:, c],
                Gram=gram,
                n_samples=n_samples,
                method="lasso",
                positive=nonnegative,
                max_iter=min(steps, longest),
            )
            norms = np.abs(coefs).sum(axis=0)
            ended = len(alphas) - 1 < min(steps, longest) or steps >= longest
            if norms[-1] >= mu or ended:
                break
            steps *= 2
        above = np.flatnonzero(norms >= mu)
        if len(above) == 0:
            weights[:, c] = coefs[:, -1]
            continue
        k = above[0]
        t = (mu - norms[k - 1]) / (norms[k] - norms[k - 1])
        weights[:, c] = coefs[:, k - 1] + t * (coefs[:, k] - coefs[:, k - 1])
    return weights
