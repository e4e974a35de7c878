"""The gate models kept for reuse, on real Postgres: what is kept comes back whole, a damaged one is not reused,
and only the most recently used stay."""

from datetime import date, timedelta

import sqlalchemy as sa

from training import gate, store
from training.ranker import TrainedRanker

HOLDOUT = date(2026, 11, 2)


def fitted(text: str = "tree\nTree=0\nleaf_value=0.5\n") -> gate.FittedWeek:
    model = TrainedRanker(
        model_text=text, feature_names=["a", "b"], best_iteration=7, params={"num_leaves": 15, "seed": 42},
        feature_importance={"a": 1.5, "b": 0.0}, validation_ndcg=float("nan"),
    )  # fmt: skip
    return gate.FittedWeek(model, 120, 40)


def test_a_kept_model_comes_back_whole_and_a_damaged_one_is_trained_again(clean_stores):
    engine = clean_stores.engine
    store.ensure_schema(engine)
    assert store.reused_gate_model(engine, "k1") is None and not store.has_gate_model(engine, "k1")
    run = fitted()
    store.keep_gate_model(engine, "k1", HOLDOUT, run)
    assert store.has_gate_model(engine, "k1")

    reused = store.reused_gate_model(engine, "k1")

    assert (reused.train_rows, reused.valid_rows) == (120, 40)
    got, want = reused.model, run.model
    assert (got.model_text, got.feature_names, got.best_iteration, got.params, got.feature_importance) == (
        want.model_text, want.feature_names, want.best_iteration, want.params, want.feature_importance,
    )  # fmt: skip
    assert got.validation_ndcg != got.validation_ndcg  # NaN kept as NaN
    with engine.begin() as conn:
        conn.execute(sa.text("update gate_models set model_text = model_text || 'x' where key = 'k1'"))
    assert store.reused_gate_model(engine, "k1") is None, "a text that no longer matches its sha256 is not reused"
    store.keep_gate_model(engine, "k1", HOLDOUT, run)  # trained again: the kept text is replaced
    assert store.reused_gate_model(engine, "k1").model.model_text == run.model.model_text


def test_only_the_most_recently_used_models_stay(clean_stores, monkeypatch):
    engine = clean_stores.engine
    store.ensure_schema(engine)
    monkeypatch.setattr(store, "GATE_MODELS_KEPT", 3)
    for n in range(3):
        store.keep_gate_model(engine, f"k{n}", HOLDOUT + timedelta(weeks=n), fitted())
    assert store.reused_gate_model(engine, "k0") is not None  # used again: now the most recent

    store.keep_gate_model(engine, "k3", HOLDOUT + timedelta(weeks=3), fitted())

    with engine.connect() as conn:
        kept = set(conn.execute(sa.text("select key from gate_models")).scalars())
    assert kept == {"k0", "k2", "k3"}, "the least recently used (k1) goes"
