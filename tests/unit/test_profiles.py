from pathlib import Path

import pytest

from router.profiles import ProfileError, ProfileSet, UnknownProfile, load_profiles
from tests.conftest import PROFILES

MODELS = ["Mistral-7B-Instruct-v0.2", "mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "profiles.toml"
    p.write_text(text)
    return p


def test_shipped_profiles_load():
    profiles = load_profiles(PROFILES, MODELS)
    assert profiles["default"].tier_names == ("budget", "mid", "frontier")
    assert profiles["routellm-pair"].models == ("mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview")
    assert profiles["default"].mode == "floor" and 0 <= profiles["default"].floor <= 1
    assert len(profiles["default"].version) == 12
    # prices come from config/prices.toml, which the profiles file names
    assert profiles["default"].prices == ((0.2, 0.6, 10.0), (0.2, 0.6, 30.0))
    assert [r.name for r in profiles["default"].rules] == ["legal-review-frontier", "summaries-not-above-mid"]


def test_profile_set_default_and_unknown():
    ps = ProfileSet.load(PROFILES, "default", MODELS)
    assert ps.get("").name == "default"
    assert ps.get("routellm-pair").name == "routellm-pair"
    with pytest.raises(UnknownProfile):
        ps.get("nope")
    with pytest.raises(ProfileError, match="default profile 'nope' is not defined"):
        ProfileSet.load(PROFILES, "nope", MODELS)


def test_unknown_model_is_named_with_its_key(tmp_path):
    p = write(tmp_path, '[profiles.x]\nfloor = 0.5\ntiers = [{name="a", model="gpt-9"}]\n')
    with pytest.raises(ProfileError, match=r"profiles\.x\.tiers\.0\.model: unknown model 'gpt-9'") as e:
        load_profiles(p, MODELS)
    assert str(p) in str(e.value)


TIERS = (
    'tiers = [{name="a", model="m", price_input=1, price_output=2}, '
    '{name="b", model="n", price_input=3, price_output=4}]\n'
)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[profiles.x\n", "not valid TOML"),
        ("title = 1\n", r"needs at least one \[profiles.<name>\] table"),
        ("[profiles.x]\nfloor = 1.5\n" + TIERS, r"profiles\.x\.floor"),
        ("[profiles.x]\nfloor = 0.5\ntiers = []\n", r"profiles\.x\.tiers"),
        ('[profiles.x]\ntiers = [{name="a", model="m"}]\n', r"profiles\.x\.tiers\.0: model 'm' has no price"),
        (
            '[profiles.x]\nfloor = 0.5\ntiers = [{name="a", model="m"}, {name="a", model="n"}]\n',
            "tier names must be unique",
        ),
        ("[profiles.x]\nfloor = 0.5\nflor = 0.4\n" + TIERS, r"profiles\.x\.flor: Extra inputs"),
        ('[profiles.x]\nmode = "cheap"\n' + TIERS, r"profiles\.x\.mode: Input should be"),
        ('[profiles.x]\nmode = "rework"\n' + TIERS, r"profiles\.x: .*rework_cost"),
        ('[profiles.x]\nmode = "share"\nshares = {a = 0.5, b = 0.6}\nfloors = [0.5, 0.0]\n' + TIERS,
         "unreachable target"),
        ('[profiles.x]\nmode = "share"\nshares = {a = 0.5}\nfloors = [0.5, 0.0]\n' + TIERS,
         "or for the last tier"),
        ('[profiles.x]\nmode = "share"\nshares = {b = 0.2}\n' + TIERS, "floors: missing; run `python -m training"),
        ('[profiles.x]\nmode = "budget"\nbudget_per_1k = 0.01\nbudget_lambda = 1.0\n' + TIERS,
         r"budget_per_1k: unreachable target"),
        ("[profiles.x]\n" + TIERS + '[[profiles.x.rules]]\nname = "r"\nworkflow = "w"\npin_tier = "zz"\n',
         r"rules\.0\.pin_tier: 'zz' is not a tier"),
        ("[profiles.x]\n" + TIERS + '[[profiles.x.rules]]\nname = "r"\npattern = "(("\nmax_tier = "a"\n',
         r"profiles\.x\.rules\.0\.pattern: .*not a valid regular expression"),
        ("[profiles.x]\n" + TIERS + '[[profiles.x.rules]]\nname = "r"\nmin_tier = "a"\nmax_tier = "b"\n',
         "exactly one of"),
        ('prices = "absent.toml"\n[profiles.x]\n' + TIERS, "cannot read price catalog"),
    ],
)
def test_bad_files_are_rejected_naming_file_and_key(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ProfileError, match=match) as e:
        load_profiles(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="cannot read"):
        load_profiles(tmp_path / "absent.toml")


def test_profile_set_leaves_out_profiles_with_unknown_models_but_not_the_default():
    mmlu_only = ["mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"]
    ps = ProfileSet.load(PROFILES, "routellm-pair", mmlu_only)
    assert list(ps.profiles) == ["routellm-pair"]
    with pytest.raises(ProfileError, match=r"profiles\.default\.tiers\.0\.model: unknown model"):
        ProfileSet.load(PROFILES, "default", mmlu_only)


def test_price_catalog_names_model_and_key(tmp_path):
    (tmp_path / "prices.toml").write_text('[models.m]\ninput = 1.0\noutput = -2\nchecked = 2024-01-01\n')
    p = write(tmp_path, 'prices = "prices.toml"\n[profiles.x]\ntiers = [{name="a", model="m"}]\n')
    with pytest.raises(ProfileError, match=r"prices\.toml: models\.m\.output: Input should be greater"):
        load_profiles(p)


def test_shipped_catalog_prices_every_model_the_default_router_model_knows():
    from router.artifacts import read_manifest, resolve_model_dir
    from router.profiles import load_prices
    prices = load_prices(PROFILES.parent / "prices.toml")
    manifest = read_manifest(resolve_model_dir(PROFILES.parent.parent / "models"))
    assert set(manifest.head.models) <= set(prices)
    assert all(p.checked.year >= 2024 for p in prices.values())


def test_live_profiles_reload_keeps_last_good_on_a_broken_file(tmp_path, caplog):
    from router.profiles import LiveProfiles

    p = write(tmp_path, "[profiles.default]\nfloor = 0.5\n" + TIERS)
    live = LiveProfiles(p, "default")
    v1 = live.current.version
    p.write_text("[profiles.default]\nfloor = 0.9\n" + TIERS)
    assert live.changed() and live.reload()
    assert live.current.get("").floor == 0.9 and live.current.version != v1
    good = live.current
    p.write_text("[profiles.default]\nfloor = 0.9\n" + TIERS.replace("price_input=3", "price_input=-3"))
    assert live.changed() and not live.reload()
    assert live.current is good and "price_input" in (live.last_error or "")
    assert not live.changed()


def test_the_documented_example_loads(tmp_path):
    import re

    doc = (PROFILES.parent.parent / "docs" / "profiles.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "prices.toml").write_bytes((PROFILES.parent / "prices.toml").read_bytes())
    profile = load_profiles(write(tmp_path, example))["support"]
    assert profile.mode == "rework" and len(profile.rules) == 5
    assert profile.prices[0] == (0.2, 0.6, 9.0)  # the tier's own price beats the catalog
    assert profile.pinned_prices == {"llama-3.1-70b-instruct": (0.88, 0.88)}
