"""The training flow on real Postgres and Prefect: train, evaluate, register, gate.

One backfill of the feature flow (tiny synthetic log of `flow_env`) that also holds the week
after the training as_of (features and labels), then three training runs as of the same week,
each gated on the last RECSYS_GATE_WEEKS labelled weeks pooled:
the first model beats the baselines and becomes champion (seeing nothing of the later week);
against a degenerate champion the identical retrain is rejected while RECSYS_PROMOTION_MARGIN
asks for more than it gains, and replaces the champion once the margin is back to its default.
"""

import hashlib
import re
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from features import contracts
from features import store as feature_store
from flows.configs import history_weeks, plan_options
from flows.feature_flow import feature_flow
from flows.training_flow import training_flow
from ranking import registry
from ranking.candidates import FEATURE_NAMES, SOURCES, CandidateConfig, source_counts
from recsys.settings import Settings
from recsys.stores import open_stores
from tests.conftest import artifact_text
from training import evaluation, frames, gate
from training import store as training_store
from training.evaluation import BASELINES

pytestmark = pytest.mark.integration

NEWEST = date(2026, 11, 23)  # the newest feature week in the store
AS_OF = NEWEST - timedelta(weeks=1)  # training's as_of: the store holds a later snapshot and later labels
ARTIFACT_KEY = "training-metrics"
BUDGET = 200
BANDS = 2
VALIDATION_WEEKS = 2


def train() -> tuple[dict, str]:
    state = training_flow(as_of=AS_OF, return_state=True)
    return state.result(), artifact_text(state, ARTIFACT_KEY)


def promote_a_degenerate_copy(settings: Settings, champion: registry.ModelRecord) -> int:
    """Register the champion with every leaf value negated (it ranks candidates upside down) and make it champion."""
    with open_stores(settings) as stores:
        _, record = registry.load_model(stores.engine, settings.model_name, champion.version)
        with stores.engine.connect() as conn:
            text = conn.execute(
                sa.text("select model_text from model_versions where name = :n and version = :v"),
                {"n": record.name, "v": record.version},
            ).scalar_one()
        negated = re.sub(
            r"^leaf_value=(.*)$",
            lambda m: "leaf_value=" + " ".join(repr(-float(v)) for v in m.group(1).split()),
            text,
            flags=re.MULTILINE,
        )
        # The header's byte sizes of the trees no longer hold (LightGBM aborts the process on them);
        # without the line LightGBM reads the trees one after another.
        negated = re.sub(r"^tree_sizes=.*\n", "", negated, flags=re.MULTILINE)
        assert negated != text and "leaf_value=" in negated
        fields = {f: getattr(record, f) for f in ("feature_names", "encodings", "metrics", "as_of",
                                                 "feature_snapshots")}  # fmt: skip
        first_gate_week = date.fromisoformat(record.metrics["gate_weeks"][0])
        fields |= {
            "params": {k: v for k, v in record.params.items() if k != "recipe"},  # not the flow's recipe
            "training_as_ofs": [first_gate_week - timedelta(weeks=2)],
            "validation_as_of": first_gate_week - timedelta(weeks=1),
            "holdout_as_of": first_gate_week,
        }
        return registry.register_model(
            stores.engine, name=record.name, model_text=negated, **fields,
            promote_reason="test: a champion that ranks upside down", actor="test",
        )  # fmt: skip


def record_frames_held_at_holdout_reads(monkeypatch) -> list[tuple[date, list[date]]]:
    """(holdout week, weeks whose frames the training flow's cache holds) at each holdout read."""
    caches, held = [], []

    class RecordedCache(gate.FrameCache):
        def __init__(self, build) -> None:
            super().__init__(build)
            caches.append(self)

    read = training_store.read_sampled_week

    def recording(engine, week, sample):
        if getattr(sample, "func", None) is evaluation.sample_holdout_users:  # the holdout, not a training week's frame
            held.append((week, sorted({w for w, _ in caches[-1]._frames})))
        return read(engine, week, sample)

    monkeypatch.setattr(gate, "FrameCache", RecordedCache)
    monkeypatch.setattr(training_store, "read_sampled_week", recording)
    return held


def assert_small_weeks_widen_from_the_store_counts(settings: Settings, weeks: list[date]) -> None:
    """The store counts each week's labelled users as the training frames do, and the plans widen on them:
    training weeks holding fewer than RECSYS_MIN_TRAINING_USERS take older passed weeks, newest first."""
    with open_stores(settings) as stores:
        engine = stores.engine
        counts = feature_store.count_labelled_users(engine, weeks)
        for week in weeks:
            labels, tables = training_store.read_labels(engine, week), training_store.read_tables(engine, week)
            assert counts[week] == frames.labelled_users(labels, tables).len() > 0, week
        assert feature_store.count_labelled_users(engine, weeks, at_most=5) == dict.fromkeys(weeks, 5)
        options = plan_options(settings) | {"validation_weeks": VALIDATION_WEEKS, "max_training_weeks": 12}
        plain = training_store.plan_training(engine, AS_OF, **options | {"min_training_users": 0})
        enough = training_store.plan_training(engine, AS_OF, **options | {"min_training_users": 1})
        widened = training_store.plan_training(engine, AS_OF, **options | {"min_training_users": 10**6})
        features = set(feature_store.passed_as_ofs(engine, contracts.USER_FEATURES.name))
        labelled = [w for w in feature_store.passed_as_ofs(engine, contracts.LABELS.name) if w in features]
    assert enough == plain, "training weeks that already hold the users plan as without widening"
    assert [p.holdout for p in widened] == [p.holdout for p in plain]
    for wide, narrow in zip(widened, plain, strict=True):
        older = [w for w in labelled if w < narrow.train[0]]  # all of them: far fewer than a million users
        assert (wide.train, wide.validation) == ([*older, *narrow.train], narrow.validation)
    assert len(widened[-1].train) > len(plain[-1].train), "the store holds weeks older than the latest plan's"


def champion_version(settings: Settings) -> int:
    with open_stores(settings) as stores:
        return registry.get_champion(stores.engine, settings.model_name).version


def test_first_model_becomes_champion_and_the_gate_keeps_or_replaces_it(flow_env: Settings, monkeypatch):
    monkeypatch.setenv("RECSYS_CANDIDATES_PER_USER", str(BUDGET))  # candidates allocated by recall (default off)
    monkeypatch.setenv("RECSYS_CANDIDATE_BANDS", str(BANDS))  # ... per history-length band
    # Early stopping on two validation weeks pooled; the refit trains on them too.
    monkeypatch.setenv("RECSYS_VALIDATION_WEEKS", str(VALIDATION_WEEKS))
    first_week = AS_OF - timedelta(weeks=history_weeks(Settings()))
    written = feature_flow(as_of=NEWEST, source="synthetic", backfill_from=first_week)
    assert {str(AS_OF), str(NEWEST)} <= set(written), "the store must hold the weeks at and after as_of"

    held = record_frames_held_at_holdout_reads(monkeypatch)
    first, first_artifact = train()
    metrics, gains = first["metrics"], first["gains"]
    # Memory: while a gate week's holdout is read and evaluated, the frame cache holds only the frames later
    # gate weeks or the refit (through the newest gate week) train or validate on, never the week's own first
    # training week.
    holdouts = [date.fromisoformat(w) for w in first["gate_weeks"]]
    assert [week for week, _ in held] == holdouts
    span = flow_env.training_weeks + VALIDATION_WEEKS  # a plan's training and validation weeks before its holdout
    refit_weeks = [holdouts[-1] - timedelta(weeks=n) for n in range(span - 1, -1, -1)]
    for i, (week, cached) in enumerate(held):
        later = {h - timedelta(weeks=n) for h in holdouts[i + 1 :] for n in range(1, span + 1)} | set(refit_weeks)
        assert set(cached) <= later and week - timedelta(weeks=span) not in cached, (week, cached)
    # (the newest week's frame is built after its holdout evaluation, for the refit)
    assert held[-1][1] == refit_weeks[:-1], "the last gate week's holdout is evaluated holding only the refit's frames"
    # Labels of the week [AS_OF, NEWEST) exist but close after as_of: the last gate week is the week before.
    gate_weeks = [str(AS_OF - timedelta(weeks=n)) for n in range(flow_env.gate_weeks, 0, -1)]
    assert first["gate_weeks"] == gate_weeks and first["holdout"] == gate_weeks[-1]
    assert first["stale_upstream"] is None
    assert first["reused_gate_models"] == [], "an empty store has no earlier gate model to reuse"
    assert set(gains) == set(BASELINES) and metrics["model"]["users"] == gains["ease"]["units"]
    best = max(BASELINES, key=lambda name: metrics[name]["ndcg@10"])
    assert gains[best]["low"] > 0, "the tiny demo model should clearly beat every baseline"
    assert first["promote"] is True
    assert first["reason"].startswith(f"no champion yet: candidate ndcg@10 vs {best} (the best baseline): gain")
    assert "[95% CI" in first["reason"] and f"pooled over 2 weeks {gate_weeks[0]}" in first["reason"]
    assert 0 < first["candidate_recall"]["all"] <= 1
    assert "promoted to champion" in first_artifact and "Candidate recall" in first_artifact
    assert all(name in first_artifact for name in ["model", *BASELINES, *gate_weeks])
    interval = f"{gains[best]['gain']:+.1%} [{gains[best]['low']:+.1%}, {gains[best]['high']:+.1%}]"
    assert interval in first_artifact

    with open_stores(flow_env) as stores:
        champion = registry.get_champion(stores.engine, flow_env.model_name)
    assert champion.version == first["version"]
    # Lineage: the snapshots, weeks, features and encodings the model was built from; the digests are
    # the ones the feature flow computed when it wrote each table, and nothing at or after as_of.
    # The registered model is the gate's recipe refitted through the newest labelled week (the last gate week),
    # on the weeks the next run plans for its gate model of the week after: one week later than the gate's.
    weeks = [AS_OF - timedelta(weeks=n) for n in range(flow_env.training_weeks + VALIDATION_WEEKS + 1, 0, -1)]
    assert champion.training_as_ofs == weeks[1 : flow_env.training_weeks + 1]
    assert (champion.validation_as_of, champion.holdout_as_of) == (weeks[-1], None)
    assert champion.validation_as_of == date.fromisoformat(gate_weeks[-1])
    validation = [str(w) for w in weeks[flow_env.training_weeks + 1 :]]
    assert champion.params["validation_weeks"] == first["validation_weeks"] == validation and len(validation) == 2
    assert first["training_weeks"] == [str(w) for w in champion.training_as_ofs] and first["refit_reused"] is False
    for week in weeks:
        for table, digest in written[str(week)].items():
            if table != "labels":  # a week's run writes the labels of the week before it
                assert champion.feature_snapshots[f"{table}@{week}"] == digest, (table, week)
        later = week + timedelta(weeks=1)
        assert champion.feature_snapshots[f"labels@{week}"] == written[str(later)]["labels"], week
    used = {date.fromisoformat(key.split("@")[1]) for key in champion.feature_snapshots}
    assert max(used) < AS_OF, f"the model's lineage names weeks at or after as_of {AS_OF}: {sorted(used)}"
    assert_small_weeks_widen_from_the_store_counts(flow_env, weeks)
    assert champion.feature_names == FEATURE_NAMES
    assert champion.encodings["category"] == sorted(champion.encodings["category"])
    assert champion.params["candidates"]["exclude_consumed"] is True
    # Candidates allocated by recall on the earliest gate plan's training and validation weeks, before every
    # gate holdout, within RECSYS_CANDIDATES_PER_USER; the counts are the model's, stored with it.
    allocated = first["allocation"]
    assert allocated["budget"] == BUDGET and allocated["candidates_per_user"] <= allocated["budget"]
    assert max(allocated["weeks"]) < gate_weeks[0] and allocated["users"] > 0
    assert {s: champion.params["candidates"][s] for s in SOURCES} == allocated["counts"]
    assert champion.params["allocation"] == allocated
    assert 0 < allocated["recall"] <= 1 and set(allocated["single_source"]) == set(SOURCES)
    # Per history band: the edge from the same weeks, each band's counts stored with the model
    # as the candidates it is served on; the sources are generated as deep as the deepest band needs.
    assert len(allocated["band_edges"]) == BANDS - 1 and len(allocated["band_counts"]) == BANDS
    assert champion.params["candidates"]["band_edges"] == allocated["band_edges"]
    assert champion.params["candidates"]["band_counts"] == [[c[s] for s in SOURCES] for c in allocated["band_counts"]]
    assert allocated["counts"] == {s: max(c[s] for c in allocated["band_counts"]) for s in SOURCES}
    assert (
        "Candidates per user allocated by measured recall by history length (events before the week) on "
        + ", ".join(allocated["weeks"])
        in first_artifact
    )
    assert champion.metrics["candidate_recall"] == first["candidate_recall"]
    assert champion.metrics["gains"] == first["gains"] and champion.metrics["gate_weeks"] == gate_weeks

    # The gate's wiring, against a champion that ranks upside down: RECSYS_PROMOTION_MARGIN reaches the
    # gate (a margin out of reach rejects the candidate and leaves the alias alone), and without it the
    # better candidate replaces the champion. The copy is another recipe trained through the first gate week's
    # validation week: both gate weeks are out of sample for it, and a candidate must beat it.
    degenerate = promote_a_degenerate_copy(flow_env, champion)
    monkeypatch.setenv("RECSYS_PROMOTION_MARGIN", "1000")  # a thousand times the champion's NDCG
    monkeypatch.setenv("RECSYS_REUSE_GATE_MODELS", "false")  # trained again: the determinism check below is real
    demanding, demanding_artifact = train()
    assert demanding["reused_gate_models"] == []
    assert demanding["promote"] is False and "margin" in demanding["reason"], demanding["reason"]
    assert demanding["metrics"]["model"]["ndcg@10"] > demanding["metrics"]["champion"]["ndcg@10"]
    assert demanding["champion_weeks"] == gate_weeks and "a new recipe must beat the champion" in demanding["reason"]
    assert "does not clear the margin 100000.00%" in demanding["reason"], demanding["reason"]
    assert "rejected" in demanding_artifact
    assert champion_version(flow_env) == degenerate

    monkeypatch.delenv("RECSYS_PROMOTION_MARGIN")
    monkeypatch.delenv("RECSYS_REUSE_GATE_MODELS")
    better, better_artifact = train()
    assert better["reused_gate_models"] == gate_weeks, "the same plans, snapshots and settings reuse every gate model"
    assert better["refit_reused"] is True, "... and the refit the first run kept"
    assert better["promote"] is True, better["reason"]
    assert champion_version(flow_env) == better["version"] != degenerate
    assert "promoted to champion" in better_artifact

    with open_stores(flow_env) as stores:
        moves = registry.history(stores.engine, flow_env.model_name).select("from_version", "to_version").rows()
        models = registry.list_models(stores.engine, flow_env.model_name)
        rejected = registry.get_model(stores.engine, flow_env.model_name, demanding["version"])
        with stores.engine.connect() as conn:
            texts = dict(conn.execute(sa.text("select version, model_sha256 from model_versions")).all())
    assert moves == [(None, first["version"]), (first["version"], degenerate), (degenerate, better["version"])]
    statuses = dict(models.select("version", "status").rows())
    assert statuses[demanding["version"]] == "rejected" and statuses[better["version"]] == "champion"
    assert rejected.decision["reason"] == demanding["reason"]
    assert texts[first["version"]] == texts[demanding["version"]] == texts[better["version"]], (
        "same snapshots and seed must give the same model"
    )
    assert better["metrics"]["model"] == first["metrics"]["model"], "a reused model scores as it did when trained"

    with open_stores(flow_env) as stores, stores.engine.connect() as conn:
        kept = conn.execute(sa.text("select holdout_as_of, model_text from gate_models")).all()
    assert sorted(str(week) for week, _ in kept) == [*gate_weeks, str(AS_OF)], "one per gate week, and the refit"
    refit_kept = [text for week, text in kept if week == AS_OF]  # next week's gate model of as_of's week
    assert [hashlib.sha256(t.encode()).hexdigest() for t in refit_kept] == [texts[first["version"]]]

    # Optuna tuning (RECSYS_TUNING_SECONDS): on the earliest gate plan's validation week, stored with the model;
    # in the same run a budget of 0 keeps the fixed candidate counts.
    assert first["tuning"] is None and "tuning" not in champion.params
    monkeypatch.setenv("RECSYS_TUNING_SECONDS", "600")
    monkeypatch.setenv("RECSYS_TUNING_TRIALS", "2")
    monkeypatch.setenv("RECSYS_CANDIDATES_PER_USER", "0")
    tuned, _ = train()
    assert tuned["tuning"]["trials"] == 2
    assert tuned["tuning"]["validation_ndcg@10_tuned"] >= tuned["tuning"]["validation_ndcg@10_untuned"]
    with open_stores(flow_env) as stores:
        record = registry.get_model(stores.engine, flow_env.model_name, tuned["version"])
    assert record.params["tuning"] == tuned["tuning"]
    assert all(record.params[name] == value for name, value in tuned["tuning"]["chosen"].items())
    assert tuned["allocation"] is None and "allocation" not in record.params
    assert {s: record.params["candidates"][s] for s in SOURCES} == source_counts(CandidateConfig())

    # RECSYS_GATE_USERS_PER_WEEK: each gate week evaluates that many of its labelled users (a fixed hash
    # sample), every recommender the same ones; every week, gate and training alike, is read with only
    # its sampled users' rows in the user-keyed tables (the user ids alone are read whole).
    monkeypatch.delenv("RECSYS_TUNING_SECONDS")
    monkeypatch.setenv("RECSYS_CANDIDATES_PER_USER", str(BUDGET))  # the allocation's reads are bounded too
    reads = []
    read_table = feature_store.read_table

    def recording(engine, table, as_of, **options):
        columns = options.get("columns")
        reads.append((table, options.get("user_ids"), tuple(columns) if columns is not None else None))
        return read_table(engine, table, as_of, **options)

    monkeypatch.setattr(feature_store, "read_table", recording)
    monkeypatch.setenv("RECSYS_GATE_USERS_PER_WEEK", "25")
    bounded, _ = train()
    assert bounded["metrics"]["model"]["users"] == 25 * flow_env.gate_weeks < first["metrics"]["model"]["users"]
    # The champion (trained through the newest gate week) is never scored on weeks it trained on: left out.
    assert bounded["champion_weeks"] == [] and "champion" not in bounded["metrics"]
    assert "no out-of-sample evidence" in bounded["reason"] and bounded["promote"] is False
    assert {name: m["users"] for name, m in bounded["metrics"].items()} == dict.fromkeys(
        ["model", *BASELINES], 25 * flow_env.gate_weeks
    )
    assert {g["units"] for g in bounded["gains"].values()} == {25 * flow_env.gate_weeks}
    keyed = {t.name for t in (*contracts.FEATURE_TABLES, contracts.LABELS) if "user_id" in t.column_names}
    whole = [(table, columns) for table, users, columns in reads if table in keyed and users is None]
    assert whole and set(whole) <= {("user_features", ("user_id",)), ("labels", None)}, whole
    sampled = [len(users) for table, users, _ in reads if table == "collaborative_scores"]
    assert 25 in sampled and all(n <= max(25, flow_env.training_users_per_week) for n in sampled)


def test_the_served_model_trains_through_the_newest_week_and_next_weeks_run_reuses_it_as_a_gate_model(
    flow_env: Settings,
):
    """Issue #14: the champion is the gate's recipe refitted through the newest labelled week H; the run one week
    later scores that very model as its gate model of H + 1 week (no extra fit), compares the champion only on
    that week (the only one after its training) and lets the refresh of its recipe replace it."""
    first_week = AS_OF - timedelta(weeks=history_weeks(Settings()))
    feature_flow(as_of=NEWEST, source="synthetic", backfill_from=first_week)
    newest_labelled = AS_OF - timedelta(weeks=1)

    first = training_flow(as_of=AS_OF)
    assert first["promote"] is True and first["holdout"] == str(newest_labelled)
    with open_stores(flow_env) as stores:
        served = registry.get_champion(stores.engine, flow_env.model_name)
        with stores.engine.connect() as conn:
            served_text = conn.execute(
                sa.text("select model_text from model_versions where version = :v"), {"v": served.version}
            ).scalar_one()
    assert served.version == first["version"]
    assert served.validation_as_of == newest_labelled, "the served model learnt from the newest labelled week"
    assert served.training_as_ofs == [
        newest_labelled - timedelta(weeks=n) for n in range(flow_env.training_weeks, 0, -1)
    ]
    assert served.holdout_as_of is None and served.params["recipe"]
    assert served.decision["reason"] == first["reason"] and served.metrics["gate_weeks"] == first["gate_weeks"]
    assert f"labels@{newest_labelled}" in served.feature_snapshots and f"labels@{AS_OF}" not in served.feature_snapshots

    # One week later: H + 1 week (AS_OF) is labelled; its gate model is the served refit, reused, not trained.
    following = training_flow(as_of=NEWEST)
    assert following["holdout"] == str(AS_OF)
    assert following["reused_gate_models"] == following["gate_weeks"], "every gate model reused: one fit, the refit"
    assert following["refit_reused"] is False
    assert following["metrics"]["model"] != first["metrics"]["model"]
    with open_stores(flow_env) as stores, stores.engine.connect() as conn:
        kept = conn.execute(
            sa.text("select model_text from gate_models where holdout_as_of = :w"), {"w": AS_OF}
        ).scalars().all()  # fmt: skip
    assert kept == [served_text], "the gate model of AS_OF is the model served since the first run"
    # The champion (trained through H) is compared only on AS_OF; the refit of its recipe is judged as a refresh.
    assert following["champion_weeks"] == [str(AS_OF)]
    assert following["metrics"]["champion"]["users"] < following["metrics"]["model"]["users"]
    assert following["gains"]["champion"]["units"] == following["metrics"]["champion"]["users"]
    assert "the candidate is the champion's recipe refitted on newer weeks" in following["reason"]
    assert f"vs the champion (out of sample: holdout {AS_OF})" in following["reason"]
    champion_gain = following["gains"]["champion"]
    best = max(BASELINES, key=lambda name: following["metrics"][name]["ndcg@10"])
    # The champion's out-of-sample week is scored by the champion itself (reused): a tie, never worse.
    assert champion_gain["gain"] == 0 and champion_gain["model"] == champion_gain["other"]
    assert following["gains"][best]["high"] >= 0, "the tiny demo's model is not worse than its best baseline"
    assert following["promote"] is True and following["reason"].endswith(
        "beyond noise (an upper bound below 0): it is not"
    )
    assert champion_version(flow_env) == following["version"], "the refresh serves: the model does not go stale"
    with open_stores(flow_env) as stores:
        newer = registry.get_model(stores.engine, flow_env.model_name, following["version"])
        assert newer.validation_as_of == AS_OF and newer.params["recipe"] == served.params["recipe"]
        # Nothing registered is lost: the alias goes back to the model served the week before.
        assert registry.rollback(stores.engine, flow_env.model_name, reason="test: rollback", actor="test") == (
            served.version
        )
