"""Erasure metrics (Receler protocol). Accuracies are percentages in [0, 100]."""

from __future__ import annotations


def harmonic_h(acc_e: float, acc_r: float, acc_l: float) -> float:
    """Harmonic mean of (100 - Acc_E, 100 - Acc_R, Acc_L); 0 when any term is 0.

    Lower Acc_E (efficacy) and Acc_R (robustness) and higher Acc_L (locality) are better.
    """
    terms = (100.0 - acc_e, 100.0 - acc_r, acc_l)
    if min(terms) <= 0:
        return 0.0
    return 3.0 / sum(1.0 / t for t in terms)
