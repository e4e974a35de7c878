"""The training flow on real Postgres and Prefect: train, evaluate, register, gate.

One backfill of the feature flow (tiny synthetic log of `flow_env`), then two training
runs as of the same week: the first model beats the baselines and becomes champion;
the identical retrain is not strictly better, so it is registered as rejected.
"""

from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from flows.feature_flow import feature_flow
from flows.training_flow import training_flow
from ranking import registry
from ranking.candidates import FEATURE_NAMES
from recsys.settings import Settings
from recsys.stores import open_stores
from tests.conftest import artifact_text
from training.evaluation import BASELINES

pytestmark = pytest.mark.integration

AS_OF = date(2026, 11, 23)
ARTIFACT_KEY = "training-metrics"


def train() -> tuple[dict, str]:
    state = training_flow(as_of=AS_OF, return_state=True)
    return state.result(), artifact_text(state, ARTIFACT_KEY)


def test_first_model_becomes_champion_and_an_identical_retrain_is_rejected(flow_env: Settings):
    first_week = AS_OF - timedelta(weeks=flow_env.training_weeks + 2)
    feature_flow(as_of=AS_OF, source="synthetic", backfill_from=first_week)

    first, first_artifact = train()
    metrics = first["metrics"]
    best = max(metrics[name]["ndcg@10"] for name in BASELINES)
    assert metrics["model"]["ndcg@10"] > best, "the tiny demo model should beat every baseline"
    assert first["promote"] is True and "no champion yet" in first["reason"]
    assert first["holdout"] == str(AS_OF - timedelta(weeks=1)) and first["stale_upstream"] is None
    assert 0 < first["candidate_recall"]["all"] <= 1
    assert "promoted to champion" in first_artifact and "Candidate recall" in first_artifact
    assert all(name in first_artifact for name in ["model", *BASELINES])

    second, second_artifact = train()
    assert second["version"] == first["version"] + 1
    assert second["metrics"]["champion"]["ndcg@10"] == second["metrics"]["model"]["ndcg@10"]
    assert second["promote"] is False and "keeps the champion" in second["reason"]
    assert "rejected" in second_artifact and "champion" in second_artifact

    with open_stores(flow_env) as stores:
        champion = registry.get_champion(stores.engine, flow_env.model_name)
        rejected = registry.get_model(stores.engine, flow_env.model_name, second["version"])
        with stores.engine.connect() as conn:
            texts = conn.execute(sa.text("select model_sha256 from model_versions order by version")).scalars().all()
    assert champion.version == first["version"] and rejected.status == "rejected"
    assert rejected.decision["reason"] == second["reason"]
    assert texts[0] == texts[1], "same snapshots and seed must give the same model"

    # Lineage: the snapshots, weeks, features and encodings the model was built from.
    weeks = [AS_OF - timedelta(weeks=n) for n in range(flow_env.training_weeks + 2, 0, -1)]
    assert champion.training_as_ofs == weeks[:-2]
    assert (champion.validation_as_of, champion.holdout_as_of) == (weeks[-2], weeks[-1])
    assert {f"labels@{w}" for w in weeks} <= set(champion.feature_snapshots)
    assert {f"item_features@{w}" for w in weeks} <= set(champion.feature_snapshots)
    assert champion.feature_names == FEATURE_NAMES
    assert champion.encodings["category"] == sorted(champion.encodings["category"])
    assert champion.params["candidates"]["exclude_consumed"] is True
    assert champion.metrics["candidate_recall"] == first["candidate_recall"]
