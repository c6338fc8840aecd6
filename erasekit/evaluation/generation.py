"""Batched image generation through a family adapter, each prompt with its own seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def generate_images(
    adapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 64,
    progress: bool | str = True,
    **generate_kwargs,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for ``prompts[i]`` with ``seeds[i]``, in batches.

    The result does not depend on ``batch_size``: every image has its own generator.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    adapter.pipe.set_progress_bar_config(disable=True)
    desc = progress if isinstance(progress, str) else "generate"
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        out.append(
            adapter.generate(
                list(prompts[start : start + batch_size]), list(seeds[start : start + batch_size]), **generate_kwargs
            )
        )
    return torch.cat(out) if out else torch.empty(0, 3, 0, 0)
