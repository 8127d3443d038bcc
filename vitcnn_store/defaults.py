"""Defaults shared by the analysis kernels and the options that expose them.

Plain Python values in a module that imports nothing, so that building the
CLI's parser (``vitcnn --help``) imports no array library.
"""

from __future__ import annotations

__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_L2_GRID", "DEFAULT_LEVEL", "MIN_HSIC_SAMPLES"]

#: Bootstrap resamples per interval when not given (``--bootstrap``).
DEFAULT_BOOTSTRAP = 1000
#: Coverage of a bootstrap interval when not given (``--ci-level``).
DEFAULT_LEVEL = 0.95

#: Ridge penalties tried by cross-validation (``--l2-grid``): 1e-3 to 1e5 in half decades.
DEFAULT_L2_GRID: tuple[float, ...] = tuple(float(10.0 ** (e / 2)) for e in range(-6, 11))

#: Fewest images per (batch) Gram each HSIC estimator is defined for, by ``unbiased``: the
#: normalisation 1/(n(n-3)) or 1/(n-1)² divides by zero below (enforced by
#: :func:`vitcnn_store.analysis.cka.check_hsic_n`; ``--batch-size`` states it).
MIN_HSIC_SAMPLES = {True: 4, False: 2}
