"""Deterministic cross-validation folds and test split over case ids."""

from __future__ import annotations

import numpy as np

from masksam.errors import UserError


def make_splits(cases: list[str], folds: int = 5, seed: int = 0, fixed_test: list[str] | None = None,
                test_fraction: float = 0.2) -> dict:
    """``{"folds": [{"train", "val"}] * folds, "test": [...]}``, a pure function of its inputs.

    The test cases are the importer's published split (``fixed_test``) when there is one,
    otherwise a seeded ``test_fraction`` of the cases (at least one once there are 3 or more).
    The remaining cases are shuffled with ``seed`` and dealt into ``folds`` validation folds.
    """
    cases = sorted(set(cases))
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if fixed_test:
        missing = sorted(set(fixed_test) - set(cases))
        if missing:
            raise UserError(f"dataset.json fixed_test_cases names cases that are not in labelsTr: "
                            f"{missing[:5]} (fix the importer output or dataset.json)")
        test = sorted(set(fixed_test))
        test_source = "dataset.json fixed_test_cases"
    else:
        n_test = int(round(test_fraction * len(cases)))
        if test_fraction > 0 and len(cases) >= 3:
            n_test = max(1, n_test)
        order = np.random.default_rng([seed, 1]).permutation(len(cases))
        test = sorted(cases[i] for i in order[:n_test])
        test_source = f"test_fraction {test_fraction}"
    rest = [c for c in cases if c not in set(test)]
    if len(rest) < folds:
        raise UserError(f"{len(rest)} non-test cases cannot make {folds} folds; pass --folds "
                        f"{max(2, len(rest))} or fewer, or add cases")
    order = np.random.default_rng([seed, 2]).permutation(len(rest))
    shuffled = [rest[i] for i in order]
    parts = np.array_split(np.arange(len(shuffled)), folds)
    fold_list = []
    for part in parts:
        val = sorted(shuffled[i] for i in part)
        fold_list.append({"train": sorted(c for c in rest if c not in set(val)), "val": val})
    return {"seed": seed, "test_source": test_source, "folds": fold_list, "test": test}
