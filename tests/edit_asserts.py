"""Assertions on edits shared by the method tests."""

from __future__ import annotations

import torch


def assert_same_tensors(a, b) -> None:
    """Edits ``a`` and ``b`` hold the same tensor names with bit-identical values (a resumed
    training against the uninterrupted one, a reload against the saved edit)."""
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
