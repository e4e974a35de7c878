"""Settings are the one source of every default: a config object built without settings is the default settings' one."""

import os

import pytest

from features.collaborative import CollaborativeConfig
from flows import configs
from ranking.candidates import CandidateConfig
from recsys.settings import Settings, default_of
from training.ranker import RankerParams


@pytest.fixture
def default_settings(monkeypatch) -> Settings:
    for name in [name for name in os.environ if name.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    return Settings()


def test_configs_built_without_settings_equal_the_configs_of_the_default_settings(default_settings):
    assert CollaborativeConfig() == configs.collaborative_config(default_settings)
    assert CandidateConfig() == configs.candidate_config(default_settings)
    assert RankerParams() == configs.ranker_params(default_settings)


def test_a_default_of_a_field_settings_lack_is_refused_by_name():
    with pytest.raises(KeyError, match="Settings has no field 'ease_lambda'"):
        default_of("ease_lambda")
