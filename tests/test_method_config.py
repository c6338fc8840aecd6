"""The config base (every rule of MethodConfig and the strict --set parsing), the method registry
and ``erasekit erase --help-method``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest

from erasekit.cli import main
from erasekit.errors import ConfigError, UserError
from erasekit.files import OutputRefused
from erasekit.methods import (
    MethodConfig,
    erase,
    get_method,
    make_config,
    method_help,
    method_names,
    method_rows,
    register_method,
    registry,
    resolve_method,
    setting,
)


@dataclass
class ToyConfig(MethodConfig):
    """A config with one field per rule."""

    n: int = setting(3, "a count", low=1)
    rate: float = setting(0.5, "a step size", above=0)
    p: float = setting(0.5, "a probability", low=0, high=1)
    flag: bool = setting(False, "a switch")
    mode: str = setting("a", "a mode", choices=("a", "b"))
    tiers: str = setting("x", "tiers", sep=",", items=("x", "y"), nonempty=True)
    prompt: str = setting("{concept}", "a template", template=True)
    steps: int | None = setting(None, "optional steps", low=1)
    scale: float | None = setting(None, "optional scale", low=0)
    text: str = setting("", "free text")


ToyConfig.method_name = "toy"


def _message(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_errors_are_user_errors_and_value_errors():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert issubclass(OutputRefused, UserError) and issubclass(OutputRefused, FileExistsError)


def test_defaults_are_valid_and_fields_have_help():
    ToyConfig()
    specs = ToyConfig.field_specs()
    assert specs["n"].help == "a count" and specs["steps"].optional and specs["steps"].type is int


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", -5),
        ("n", 2.0),
        ("n", True),
        ("n", "3"),
        ("n", None),
        ("rate", 0),
        ("rate", -1e-9),
        ("rate", float("nan")),
        ("rate", float("inf")),
        ("rate", True),
        ("rate", "0.1"),
        ("p", -0.1),
        ("p", 1.5),
        ("flag", 1),
        ("flag", "true"),
        ("flag", None),
        ("mode", "c"),
        ("mode", None),
        ("tiers", ""),
        ("tiers", "x,z"),
        ("tiers", " , "),
        ("prompt", "{thing}"),
        ("prompt", "{concept"),
        ("prompt", "{0}"),
        ("steps", 0),
        ("steps", 1.5),
        ("scale", -1.0),
        ("scale", float("-inf")),
        ("text", 3),
        ("text", None),
    ],
)
def test_bad_values_are_refused_naming_method_field_and_value(field, value):
    with pytest.raises(ConfigError) as err:
        ToyConfig(**{field: value})
    text = _message(err)
    assert text.startswith(f"toy: {field} must be ")
    assert text.endswith(f"got {value!r}") or "got none" in text or "got true" in text


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 1),
        ("rate", 1e-12),
        ("rate", 2),
        ("p", 0),
        ("p", 1.0),
        ("flag", True),
        ("mode", "b"),
        ("tiers", "y, x,"),
        ("prompt", "a photo of {concept}"),
        ("prompt", "no placeholder"),
        ("steps", None),
        ("steps", 1),
        ("scale", 0),
        ("text", "{anything}"),
    ],
)
def test_good_values_are_kept_as_given(field, value):
    assert getattr(ToyConfig(**{field: value}), field) == value


def test_ranges_are_said_in_the_message():
    with pytest.raises(ConfigError, match=r"toy: n must be an integer >= 1, got 0"):
        ToyConfig(n=0)
    with pytest.raises(ConfigError, match=r"rate must be a finite number > 0, got -1"):
        ToyConfig(rate=-1)
    with pytest.raises(ConfigError, match=r"p must be a finite number in \[0, 1\], got 2"):
        ToyConfig(p=2)
    with pytest.raises(ConfigError, match=r"mode must be one of 'a', 'b', got 'c'"):
        ToyConfig(mode="c")
    with pytest.raises(ConfigError, match=r"tiers must be comma-separated items among x, y"):
        ToyConfig(tiers="z")
    with pytest.raises(ConfigError, match=r"steps must be an integer >= 1, or none, got 0"):
        ToyConfig(steps=0)


def test_replace_checks_again():
    with pytest.raises(ConfigError, match="n must be"):
        dataclasses.replace(ToyConfig(), n=0)


@pytest.mark.parametrize("word", ["true", "TRUE", "yes", "Yes", "on", "1", "false", "False", "no", "OFF", "0"])
def test_bool_words(word):
    assert ToyConfig.parse_setting("flag", word) is (word.lower() in ("true", "yes", "on", "1"))


@pytest.mark.parametrize("word", ["ture", "y", "n", "", "2", "none", "enabled"])
def test_other_bool_words_are_refused(word):
    with pytest.raises(ConfigError, match=f"toy: flag must be one of true/false, yes/no, on/off, 1/0, got {word!r}"):
        ToyConfig.parse_setting("flag", word)


@pytest.mark.parametrize("text", ["2.5", "abc", "1e3", "", "3 4", "0x10", "nan"])
def test_int_parsing_is_strict(text):
    with pytest.raises(ConfigError, match=f"toy: n must be an integer >= 1, got {text!r}"):
        ToyConfig.parse_setting("n", text)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "abc", ""])
def test_numbers_are_finite(text):
    with pytest.raises(ConfigError, match=f"toy: rate must be a finite number > 0, got {text!r}"):
        ToyConfig.parse_setting("rate", text)


def test_parsing_to_each_type():
    assert ToyConfig.parse_setting("n", "-3") == -3  # its range is checked when the config is made
    assert ToyConfig.parse_setting("rate", "1e-3") == 1e-3 and ToyConfig.parse_setting("rate", "5") == 5.0
    assert ToyConfig.parse_setting("steps", "None") is None and ToyConfig.parse_setting("scale", "none") is None
    assert ToyConfig.parse_setting("text", "none") == "none"  # text stays text
    with pytest.raises(ConfigError, match="n must be an integer >= 1, got 'none'"):
        ToyConfig.parse_setting("n", "none")  # not optional


def test_unknown_setting_lists_the_known_ones():
    with pytest.raises(ConfigError, match="toy has no setting 'depth'; settings: n, rate, p, flag, mode"):
        ToyConfig.parse_setting("depth", "3")


def test_a_field_without_help_or_with_an_unknown_rule_is_a_bug():
    @dataclass
    class NoHelp(MethodConfig):
        n: int = 3

    with pytest.raises(TypeError, match="no help text"):
        NoHelp()

    @dataclass
    class Typo(MethodConfig):
        n: int = dataclasses.field(default=3, metadata={"help": "n", "mni": 1})

    with pytest.raises(TypeError, match="unknown rules"):
        Typo()

    @dataclass
    class ListField(MethodConfig):
        xs: list = setting("", "a list")

    with pytest.raises(TypeError, match="int, float, bool or str"):
        ListField()


def test_cross_field_check():
    with pytest.raises(ConfigError, match=r"eraseanything: rsc_steps must be an integer in \[1, rollout_steps = 2\]"):
        make_config("eraseanything", "fast", {"rollout_steps": "2", "rsc_steps": "3"})


# ---- the registry ----------------------------------------------------------------------------


def test_every_registered_method_and_preset_is_valid():
    assert method_names()[:7] == ("receler", "eraseanything", "esd", "uce", "keyword_zeroing", "sld", "mace")
    for name in method_names():
        spec = get_method(name)
        assert {"paper", "fast"} <= set(spec.presets) and callable(spec.fit)
        assert spec.config_class.method_name == name
        for preset, make in spec.presets.items():
            config = make()
            assert isinstance(config, spec.config_class)
            config.validate()
            assert make_config(name, preset) == config
        for field_spec in spec.config_class.field_specs().values():
            assert field_spec.help and "\n" not in field_spec.help


def test_variants_are_the_bench_rows():
    assert method_rows() == {
        "receler": ("receler", {}),
        "eraseanything": ("eraseanything", {}),
        "esd-x": ("esd", {"group": "esd-x"}),
        "esd-u": ("esd", {"group": "esd-u"}),
        "uce": ("uce", {}),
        "keyword_zeroing": ("keyword_zeroing", {}),
        "sld": ("sld", {}),
        "mace": ("mace", {}),
        "rece": ("rece", {}),
        "advunlearn": ("advunlearn", {}),
        "safree": ("safree", {}),
    }
    spec, fixed = resolve_method("esd-u")
    assert spec.name == "esd" and fixed == {"group": "esd-u"}
    assert make_config("esd-u", "fast").group == "esd-u" and make_config("esd-x").group == "esd-x"
    assert make_config("esd-u", "fast", {"group": "esd-u", "lr": "1e-3"}).lr == 1e-3
    with pytest.raises(ConfigError, match="esd-u: group is fixed to 'esd-u'"):
        make_config("esd-u", "fast", {"group": "esd-x"})


def test_unknown_method_and_preset():
    known = (
        "known: receler, eraseanything, esd, esd-x, esd-u, uce, keyword_zeroing, sld, mace, rece, advunlearn, safree"
    )
    with pytest.raises(ConfigError, match=f"unknown erasure method 'nope'; {known}"):
        make_config("nope")
    with pytest.raises(ConfigError, match="unknown preset 'huge' for sld; known: paper, medium, weak"):
        make_config("sld", "huge")


def test_erase_checks_the_config_before_training():
    # Each of these is refused before fit looks at the (absent) pipeline.
    with pytest.raises(ConfigError, match="esd: the config must be of type ESDConfig, got UCEConfig"):
        erase(None, "car", "esd", make_config("uce"))
    with pytest.raises(ConfigError, match="esd-u: group must be 'esd-u'"):
        erase(None, "car", "esd-u", make_config("esd"))
    config = make_config("esd")
    config.iterations = 0  # assigned after it was made
    with pytest.raises(ConfigError, match="esd: iterations must be an integer >= 1, or none, got 0"):
        erase(None, "car", "esd", config)


def test_a_plugged_in_method(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @dataclass
    class PlugConfig(MethodConfig):
        strength: float = setting(1.0, "how hard", low=0)

    def fit(pipe, concept, config, checkpoint_dir=None, progress=True):
        return (concept, config.strength)

    register_method(
        "plug",
        PlugConfig,
        {"paper": PlugConfig, "fast": lambda: PlugConfig(2.0)},
        fit,
        variants={"plug-soft": {"strength": "0.5"}},
    )
    assert "plug" in method_names() and method_rows()["plug-soft"] == ("plug", {"strength": "0.5"})
    assert erase(None, "car", "plug-soft") == ("car", 0.5)
    assert erase(None, "car", "plug", make_config("plug", "fast", {"strength": "3"})) == ("car", 3.0)
    with pytest.raises(ConfigError, match="plug: strength must be a finite number >= 0, got -1.0"):
        make_config("plug", "paper", {"strength": "-1"})
    with pytest.raises(ValueError, match="already taken"):
        register_method("other", PlugConfig, {"paper": PlugConfig}, fit, variants={"esd-u": {}})


# ---- erasekit erase --help-method ------------------------------------------------------------


def test_help_method_prints_every_setting_with_its_presets(capsys):
    assert main(["erase", "--help-method", "receler"]) == 0  # no --model / --concept / --out needed
    out = capsys.readouterr().out
    assert out.startswith("receler: Receler (ECCV 2024)")
    assert "presets: paper, fast" in out
    for field_name in get_method("receler").config_class.field_specs():
        assert f"\n{field_name} " in out
    assert re.search(r"\niterations +int: an integer >= 1\n", out)
    assert "training iterations" in out and "paper=500  fast=100" in out
    assert "extra_erasers" in out and "paper=false  fast=true" in out


def test_help_method_of_a_variant_shows_its_fixed_setting(capsys):
    assert main(["erase", "--help-method", "esd-u"]) == 0
    out = capsys.readouterr().out
    assert "esd-u is esd with group=esd-u" in out and "paper='esd-u'  fast='esd-u'" in out
    assert method_help("sld").count("paper=") == len(get_method("sld").config_class.field_specs())


def test_help_method_of_an_unknown_method_is_a_user_error(capsys):
    assert main(["erase", "--help-method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("erasekit erase: error: unknown erasure method 'nope'") and len(err.splitlines()) == 1


def test_model_concept_out_required_without_help_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["erase", "--method", "uce", "--concept", "car"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "required: --model, --out" in err and "--help-method" in err
