import pickle
import threading
from datetime import date
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from cli import main as cli
from ranking import registry
from ranking.registry import AliasChangeError, ModelIntegrityError, ModelNotFoundError
from recsys.settings import Settings
from tests.reliability.services import dump_postgres
from training.bootstrap import bootstrap_gain
from training.promotion import decide

pytestmark = pytest.mark.integration

NAME = "weekly-ranker"
FEATURES = ["cooc_score", "plays_4w", "category_code"]


@pytest.fixture(scope="module")
def trained() -> tuple[str, pd.DataFrame]:
    """A real (tiny) LambdaRank model text and rows to score with it."""
    rng = np.random.default_rng(7)
    features = pd.DataFrame(
        {
            "cooc_score": rng.normal(size=80),
            "plays_4w": rng.integers(0, 50, 80),
            "category_code": rng.integers(0, 3, 80),
        }
    )
    ranker = lgb.LGBMRanker(
        n_estimators=5, num_leaves=4, min_child_samples=2, verbose=-1,
        deterministic=True, force_row_wise=True, n_jobs=1, random_state=0,
    )  # fmt: skip
    ranker.fit(features, rng.integers(0, 3, 80), group=[10] * 8)
    return ranker.booster_.model_to_string(), features


@pytest.fixture
def engine(clean_stores) -> sa.Engine:
    registry.ensure_schema(clean_stores.engine)
    return clean_stores.engine


def register(engine: sa.Engine, model_text: str, ndcg: float = 0.2, **overrides) -> int:
    values = {
        "name": NAME,
        "model_text": model_text,
        "feature_names": FEATURES,
        "encodings": {"category_code": ["jazz", "pop", "rock"]},
        "params": {"num_leaves": 4, "n_estimators": 5},
        "metrics": {
            "model": {"ndcg@10": ndcg, "recall@10": 0.3, "users": 50},
            "baselines": {"recent_popular": {"ndcg@10": 0.1}},
            "champion": None,
        },
        "as_of": date(2024, 3, 4),
        "training_as_ofs": [date(2024, 2, 12), date(2024, 2, 19)],
        "validation_as_of": date(2024, 2, 26),
        "holdout_as_of": date(2024, 3, 4),
        "feature_snapshots": {"item_features": "ab12", "user_features": "cd34"},
        "flow_run_id": "run-1",
        "code_version": "0.1.0",
    }
    return registry.register_model(engine, **(values | overrides))


def tamper(engine: sa.Engine, version: int, text: str, sha256: str | None = None) -> None:
    """Overwrite a stored model behind the registry's back, as an attacker or bug would."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "update model_versions set model_text = :text,"
                " model_sha256 = coalesce(:sha, model_sha256) where name = :name and version = :v"
            ),
            {"text": text, "sha": sha256, "name": NAME, "v": version},
        )


@pytest.fixture
def booster_calls(monkeypatch) -> list:
    """Records every attempt to build a LightGBM booster (i.e. to parse a model)."""
    calls: list = []
    real = lgb.Booster

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lgb, "Booster", spy)
    return calls


def assert_spy_sees_an_intact_load(engine: sa.Engine, text: str, booster_calls: list) -> None:
    """The spy records the registry's parse on the success path: its silence on a refusal means something."""
    registry.load_model(engine, NAME, register(engine, text))
    assert booster_calls == [{"model_str": text}]


def test_registered_model_loads_back_with_identical_predictions_and_lineage(engine, trained):
    text, rows = trained
    version = register(engine, text)
    booster, record = registry.load_model(engine, NAME, version)

    expected = lgb.Booster(model_str=text).predict(rows)
    np.testing.assert_array_equal(booster.predict(rows), expected)
    assert booster.feature_name() == FEATURES
    assert (record.name, record.version, record.status) == (NAME, 1, "registered")
    assert record.training_as_ofs == [date(2024, 2, 12), date(2024, 2, 19)]
    assert record.holdout_as_of == date(2024, 3, 4)
    assert record.encodings == {"category_code": ["jazz", "pop", "rock"]}
    assert record.feature_snapshots == {"item_features": "ab12", "user_features": "cd34"}
    assert record.metrics["model"]["ndcg@10"] == 0.2
    assert record.model_sha256 == registry._sha256(text)
    assert registry.get_model(engine, NAME, version) == record


def test_ensure_schema_is_safe_to_run_concurrently_and_repeatedly(clean_stores):
    errors: list[BaseException] = []

    def run() -> None:
        try:
            registry.ensure_schema(clean_stores.engine)
        except Exception as error:  # collected so the test reports it
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    registry.ensure_schema(clean_stores.engine)
    assert errors == []


def test_concurrent_registrations_get_distinct_consecutive_versions(engine, trained):
    text, _ = trained
    start = threading.Barrier(8)
    versions: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            versions.append(register(engine, text, flow_run_id=f"run-{i}"))
        except Exception as error:  # collected so the test reports it
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(versions) == list(range(1, 9))
    assert registry.list_models(engine, NAME)["version"].to_list() == list(range(1, 9))


def test_changed_model_text_is_refused_naming_both_hashes(engine, trained, booster_calls):
    text, _ = trained
    version = register(engine, text)
    changed = text.replace("num_leaves=4", "num_leaves=5", 1)
    tamper(engine, version, changed)

    with pytest.raises(ModelIntegrityError) as refused:
        registry.load_model(engine, NAME, version)
    message = str(refused.value)
    assert f"model {NAME} v{version}" in message
    assert registry._sha256(text) in message
    assert registry._sha256(changed) in message
    assert booster_calls == []
    assert_spy_sees_an_intact_load(engine, text, booster_calls)


class _Planted:
    """Unpickling this creates a file: proof that a payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-unchanged", "hash-rewritten"])
def test_pickle_payload_is_refused_without_being_parsed(engine, trained, booster_calls, tmp_path, rehash):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Planted(marker), protocol=0).decode("ascii")
    version = register(engine, trained[0])
    tamper(engine, version, payload, registry._sha256(payload) if rehash else None)

    with pytest.raises(ModelIntegrityError, match=f"model {NAME} v{version}"):
        registry.load_model(engine, NAME, version)
    assert booster_calls == []
    assert not marker.exists()
    assert_spy_sees_an_intact_load(engine, trained[0], booster_calls)


def test_register_refuses_a_text_that_is_not_a_lightgbm_model(engine, trained):
    with pytest.raises(ValueError, match="does not look like a LightGBM text model"):
        register(engine, "not a model")
    with pytest.raises(ValueError, match="registered feature_names are"):
        register(engine, trained[0], feature_names=["a", "b", "c"])
    assert registry.list_models(engine, NAME).height == 0


def test_no_champion_before_the_first_promotion(engine, trained):
    register(engine, trained[0])
    assert registry.get_champion(engine, NAME) is None
    with pytest.raises(ModelNotFoundError, match="has no champion"):
        registry.load_model(engine, NAME)
    with pytest.raises(ModelNotFoundError, match="v7 is not registered"):
        registry.get_model(engine, NAME, 7)


def test_gate_keeps_the_champion_when_the_candidate_is_worse(engine, trained):
    text, _ = trained
    first = register(engine, text, ndcg=0.20)
    registry.promote(engine, NAME, first, reason="first model beats baselines", actor="training")
    champion = registry.get_champion(engine, NAME)

    # Per (user, week) NDCG: the candidate 0.15 on average, the champion 0.20, the best baseline 0.10.
    model, held, popular = [0.1, 0.2] * 20, [0.15, 0.25] * 20, [0.05, 0.15] * 20
    results = {"model": {"ndcg@10": 0.15}, "champion": champion.metrics["model"], "recent_popular": {"ndcg@10": 0.1}}
    gains = {"champion": bootstrap_gain(model, held), "recent_popular": bootstrap_gain(model, popular)}
    decision = decide(results, gains, metric="ndcg@10", margin=0.0)
    second = register(engine, text, ndcg=0.15, status="rejected", decision=decision)

    assert not decision.promote
    assert registry.get_champion(engine, NAME).version == first
    assert registry.load_model(engine, NAME)[1].version == first
    assert registry.get_model(engine, NAME, second).decision == {
        "promote": False,
        "reason": decision.reason,
    }
    with pytest.raises(AliasChangeError, match="was rejected .*keeps the champion"):
        registry.promote(engine, NAME, second, reason="try", actor="ops")
    assert registry.get_champion(engine, NAME).version == first

    registry.promote(engine, NAME, second, reason="manual override", actor="ops", force=True)
    assert registry.get_champion(engine, NAME).version == second


def test_promote_then_rollback_restores_the_previous_champion_with_audit_trail(engine, trained):
    text, _ = trained
    first, second = register(engine, text), register(engine, text, ndcg=0.3)
    registry.promote(engine, NAME, first, reason="beats baselines", actor="training-flow")
    registry.promote(engine, NAME, second, reason="ndcg +50%", actor="training-flow")
    restored = registry.rollback(engine, NAME, reason="bad online metrics", actor="alice")

    assert restored == first
    assert registry.get_champion(engine, NAME).version == first
    trail = registry.history(engine, NAME).select("alias", "from_version", "to_version", "reason", "actor")
    assert trail.rows() == [
        ("champion", None, first, "beats baselines", "training-flow"),
        ("champion", first, second, "ndcg +50%", "training-flow"),
        ("champion", second, first, "bad online metrics", "alice"),
    ]
    models = registry.list_models(engine, NAME)
    assert models.select("version", "status", "is_champion").rows() == [
        (first, "champion", True),
        (second, "retired", False),
    ]
    assert models["ndcg@10"].to_list() == [0.2, 0.3]


def test_rollback_without_an_earlier_champion_is_refused(engine, trained):
    version = register(engine, trained[0])
    with pytest.raises(AliasChangeError, match="no earlier version to roll back to"):
        registry.rollback(engine, NAME, reason="oops", actor="alice")
    registry.promote(engine, NAME, version, reason="first", actor="training-flow")
    with pytest.raises(AliasChangeError, match="no earlier version to roll back to"):
        registry.rollback(engine, NAME, reason="oops", actor="alice")
    assert registry.get_champion(engine, NAME).version == version


def test_alias_changes_refuse_unknown_versions_and_blank_reasons(engine, trained):
    version = register(engine, trained[0])
    with pytest.raises(ModelNotFoundError, match="v9 is not registered"):
        registry.promote(engine, NAME, 9, reason="typo", actor="alice", force=True)
    with pytest.raises(ValueError, match="non-empty reason"):
        registry.promote(engine, NAME, version, reason=" ", actor="alice")
    assert registry.history(engine, NAME).height == 0


def test_repeating_a_promotion_records_nothing_new(engine, trained):
    version = register(engine, trained[0])
    registry.promote(engine, NAME, version, reason="first", actor="training-flow")
    assert registry.promote(engine, NAME, version, reason="again", actor="training-flow") == version
    assert registry.history(engine, NAME).height == 1


def test_alias_history_is_append_only(engine, trained):
    version = register(engine, trained[0])
    registry.promote(engine, NAME, version, reason="first", actor="training-flow")
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("update model_alias_history set actor = 'mallory'"))
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("delete from model_alias_history"))
    assert registry.history(engine, NAME)["actor"].to_list() == ["training-flow"]


@pytest.fixture
def cli_env(settings: Settings, monkeypatch) -> Settings:
    """RECSYS_* pointing an in-process `recsys` at the session's stores."""
    monkeypatch.setenv("RECSYS_DATABASE_URL", settings.database_url.get_secret_value())
    monkeypatch.setenv("RECSYS_REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("RECSYS_DATA_DIR", str(settings.data_dir))
    return Settings()


def test_models_rollback_from_the_cli_gives_the_alias_back_and_says_who(engine, cli_env, trained, capsys):
    name = cli_env.model_name
    first, second = register(engine, trained[0], name=name), register(engine, trained[0], ndcg=0.3, name=name)
    registry.promote(engine, name, first, reason="beats baselines", actor="training-flow")
    registry.promote(engine, name, second, reason="better", actor="training-flow")

    with pytest.raises(SystemExit) as usage:  # a rollback says why
        cli.main(["models", "rollback"])
    assert usage.value.code == 2
    assert cli.main(["models", "rollback", "--reason", "online metrics dropped"]) == 0

    assert f"model {name}: champion rolled back to v{first}" in capsys.readouterr().out
    assert registry.get_champion(engine, name).version == first
    last = registry.history(engine, name).row(-1, named=True)
    assert (last["from_version"], last["to_version"], last["reason"]) == (second, first, "online metrics dropped")
    assert last["actor"] == cli.actor()

    assert cli.main(["models", "rollback", "--reason", "and back"]) == 0  # a rollback is itself undoable
    assert registry.get_champion(engine, name).version == second


def test_models_rollback_with_no_earlier_champion_is_one_error_line(engine, cli_env, trained, capsys):
    only = register(engine, trained[0], name=cli_env.model_name)
    registry.promote(engine, cli_env.model_name, only, reason="first", actor="training-flow")
    before = dump_postgres(engine)

    assert cli.main(["models", "rollback", "--reason", "oops"]) == 1

    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: AliasChangeError: ") and "no earlier version to roll back to" in line
    assert dump_postgres(engine) == before


def test_models_list_names_what_each_version_was_judged_on(engine, cli_env, trained, capsys):
    """A model held out one week; a refit held none out and carries the pooled gate weeks' metrics."""
    name = cli_env.model_name
    held_out = register(engine, trained[0], name=name)
    gate = {"model": {"ndcg@10": 0.25, "recall@10": 0.3, "users": 400}, "gate_weeks": ["2024-02-12", "2024-03-04"]}
    refit = register(engine, trained[0], name=name, holdout_as_of=None, metrics=gate)

    listed = registry.list_models(engine, name)
    assert listed.select("version", "evaluated_on").rows() == [
        (held_out, "2024-03-04"),
        (refit, "2024-02-12 … 2024-03-04 (2 weeks)"),
    ]
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "evaluated on" in out and "2024-02-12 … 2024-03-04 (2 weeks)" in out and "(user, week) units" in out


def test_evaluated_on_is_the_one_gate_week_or_nothing():
    assert registry.evaluated_on(None, ["2024-03-04"]) == "2024-03-04"
    assert registry.evaluated_on(date(2024, 3, 4), None) == "2024-03-04"
    assert registry.evaluated_on(None, None) is None
    assert registry.evaluated_on(None, []) is None
