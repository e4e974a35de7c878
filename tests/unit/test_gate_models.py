"""Which gate models a training run may reuse: the key names everything the model is a function of."""

from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import pytest

from ranking.candidates import CandidateConfig
from training import store
from training.plan import WeekPlan
from training.ranker import RankerParams

HOLDOUT = date(2026, 11, 2)
PLAN = WeekPlan(
    as_of=HOLDOUT + timedelta(weeks=1),
    train=[HOLDOUT - timedelta(weeks=3), HOLDOUT - timedelta(weeks=2)],
    validation=[HOLDOUT - timedelta(weeks=1)],
    holdout=HOLDOUT,
)
CONFIG, PARAMS = CandidateConfig(), RankerParams()
SAMPLING = {"negatives_per_user": 50, "seed": 42, "max_users": 10_000, "batch_users": 5_000}


@pytest.fixture
def digests(monkeypatch) -> dict[str, str]:
    """The stored snapshot digests the key reads, editable by the test."""
    stored = {
        f"{t}@{w}": f"{t}-{w}" for w in [*PLAN.train, *PLAN.validation, HOLDOUT] for t in ("user_features", "labels")
    }

    def of_weeks(engine, weeks):
        return {key: value for key, value in stored.items() if date.fromisoformat(key.split("@")[1]) in weeks}

    monkeypatch.setattr(store, "snapshot_digests", of_weeks)
    return stored


def key(plan=PLAN, categories=("rock", "jazz"), config=CONFIG, params=PARAMS, sampling=SAMPLING):
    return store.gate_model_key(None, plan, list(categories), config=config, params=params, sampling=sampling)


def test_the_same_inputs_give_the_same_key_and_any_change_another(digests, monkeypatch):
    base = key()
    assert key() == base
    changed = {
        "a training week": key(plan=replace(PLAN, train=PLAN.train[1:])),
        "the validation week": key(plan=replace(PLAN, validation=[PLAN.validation[0] - timedelta(days=7)])),
        "the categories": key(categories=("jazz", "rock")),
        "a candidate count": key(config=replace(CandidateConfig(), pop=CandidateConfig().pop + 10)),
        "a LightGBM parameter": key(params=replace(RankerParams(), num_leaves=31)),
        "the seed": key(params=replace(RankerParams(), seed=7)),
        "the frames' sampling": key(sampling=SAMPLING | {"max_users": 500}),
    }
    digests[f"labels@{PLAN.train[0]}"] = "recomputed"
    changed["a training week's labels"] = key()
    digests[f"labels@{PLAN.train[0]}"] = f"labels-{PLAN.train[0]}"
    assert key() == base
    monkeypatch.setattr(store, "code_fingerprint", lambda: "other code")
    changed["the code"] = key()
    assert len(set(changed.values())) == len(changed) and base not in changed.values(), changed


def test_the_holdout_weeks_own_snapshots_are_not_part_of_the_key(digests):
    """The model never sees its holdout week: recomputing that week's tables keeps the model reusable."""
    base = key()
    digests[f"user_features@{HOLDOUT}"] = "recomputed"
    assert key() == base


def test_the_source_fingerprint_follows_every_file_and_library(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    base = store.source_fingerprint([package], ["polars"])
    assert store.source_fingerprint([package], ["polars"]) == base
    (package / "sub" / "b.py").write_text("y = 3\n")
    edited = store.source_fingerprint([package], ["polars"])
    (package / "c.py").write_text("")
    added = store.source_fingerprint([package], ["polars"])
    other_library = store.source_fingerprint([package], ["polars", "numpy"])
    assert len({base, edited, added, other_library}) == 4
