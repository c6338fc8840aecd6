"""Keyword column zeroing: the naive inference-time baseline of EraseAnything (ALGORITHMS.md,
"Keyword column zeroing"): every cross-/joint-attention pays no attention to the keyword's text
tokens, in any prompt that contains the keyword. It erases the literal word and nothing else
(synonyms and paraphrases pass): it shows why the real methods exist.

Mechanism (the inference hook "keyword_zeroing" of :mod:`erasekit.edits.inference_hook`; this
module only produces the Edit). Setting the attention probabilities of the keyword's columns to zero (without
renormalising the row, as prompt-to-prompt's re-weighting does) is the same as zeroing the
keyword's rows of the attention VALUES: ``P V`` only meets column j of P through row j of V.
So the edit multiplies the keyword's rows of every text value projection's output (the
adapter's text_proj points with role "v": SD attn2.to_v; Flux dual-stream add_v_proj) by
``1 - scale``. This works with every attention backend (no processor that recomputes softmax)
and leaves other rows, and every prompt without the keyword, bit-identical. Flux single-stream
blocks (text and image already in one sequence) are not covered.

Where is the keyword? Per prompt, at inference, by a token-id rule: a forward hook on the
adapter's main text encoder sees each prompt's ids and finds the keyword's ids (tokenized alone,
no special tokens; also its lower-case, Capitalised and UPPER-case spellings) as contiguous runs
that are whole words of the prompt (the keyword "gun" leaves "handgun" alone, as token spans do).
It remembers a fingerprint of the resulting embedding rows; a pre-hook on the denoiser matches
each row of the conditioning it receives against those fingerprints (once per conditioning
tensor), so stock pipeline calls, adapter.generate and adapter.predict on adapter.encode(...)
outputs are all covered, whatever the batch layout (CFG halves, num_images_per_prompt).
Embeddings made elsewhere (not by the text encoder, or modified afterwards, e.g. soft prompts)
are not recognised and pass unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..edits import Edit
from ..edits.inference_hook import NAME as INFERENCE_HOOK
from ..edits.inference_hook import find_runs, keyword_id_runs  # noqa: F401 (re-exported)
from ..models import adapter_for
from .config import MethodConfig, setting
from .registry import register_method

NAME = "keyword_zeroing"


@dataclass
class KeywordZeroingConfig(MethodConfig):
    """Settings; nothing is trained."""

    keywords: str = setting("", "further keywords to zero besides the concept", sep=";")
    case_variants: bool = setting(True, "also match lower / Capitalised / UPPER spellings")

    @classmethod
    def fast(cls, **overrides) -> KeywordZeroingConfig:
        return cls(**overrides)


def fit(
    pipe, concept: str, config: KeywordZeroingConfig | None = None, checkpoint_dir=None, progress: bool = True
) -> Edit:
    """Instant: the Edit holds only the keywords (no tensors)."""
    config = config or KeywordZeroingConfig()
    adapter = adapter_for(pipe)
    keywords = [concept.strip()] + [k.strip() for k in config.keywords.split(";") if k.strip()]
    if not keywords[0]:
        raise ValueError("empty keyword")
    return Edit.made_on(
        adapter,
        kind=INFERENCE_HOOK,
        method=NAME,
        concepts=[concept.strip()],
        tensors={},
        hyperparameters=asdict(config) | {"keyword_list": keywords, "hook": "keyword_zeroing"},
        metrics={"train_seconds": 0.0},
    )


PRESETS = {"paper": KeywordZeroingConfig, "fast": KeywordZeroingConfig.fast}
register_method(NAME, KeywordZeroingConfig, PRESETS, fit)
