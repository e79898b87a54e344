from pathlib import Path

import pytest

from router.profiles import ProfileError, ProfileSet, UnknownProfile, load_profiles
from tests.conftest import PROFILES

MODELS = ["gpt-3.5-turbo-0301", "mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "profiles.toml"
    p.write_text(text)
    return p


def test_shipped_profiles_load():
    profiles = load_profiles(PROFILES, MODELS)
    assert profiles["default"].tier_names == ("budget", "mid", "frontier")
    assert profiles["routellm-pair"].models == ("mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview")
    assert 0 <= profiles["default"].threshold <= 1
    assert len(profiles["default"].version) == 12


def test_profile_set_default_and_unknown():
    ps = ProfileSet.load(PROFILES, "default", MODELS)
    assert ps.get("").name == "default"
    assert ps.get("routellm-pair").name == "routellm-pair"
    with pytest.raises(UnknownProfile):
        ps.get("nope")
    with pytest.raises(ProfileError, match="default profile 'nope' is not defined"):
        ProfileSet.load(PROFILES, "nope", MODELS)


def test_unknown_model_is_named_with_its_key(tmp_path):
    p = write(tmp_path, '[profiles.x]\nthreshold = 0.5\ntiers = [{name="a", model="gpt-9"}]\n')
    with pytest.raises(ProfileError, match=r"profiles\.x\.tiers\.0\.model: unknown model 'gpt-9'") as e:
        load_profiles(p, MODELS)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[profiles.x\n", "not valid TOML"),
        ("title = 1\n", r"needs at least one \[profiles.<name>\] table"),
        ('[profiles.x]\nthreshold = 1.5\ntiers = [{name="a", model="m"}]\n', r"profiles\.x\.threshold"),
        ("[profiles.x]\nthreshold = 0.5\ntiers = []\n", r"profiles\.x\.tiers"),
        ('[profiles.x]\ntiers = [{name="a", model="m"}]\n', r"profiles\.x\.threshold: Field required"),
        (
            '[profiles.x]\nthreshold = 0.5\ntiers = [{name="a", model="m"}, {name="a", model="n"}]\n',
            "tier names must be unique",
        ),
        (
            '[profiles.x]\nthreshold = 0.5\nthreshhold = 0.4\ntiers = [{name="a", model="m"}]\n',
            r"profiles\.x\.threshhold: Extra inputs",
        ),
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
