"""Training's I/O: the labelled weeks and tables it reads from the feature store, and the
registration (with lineage and the gate's decision) it writes to the model registry."""

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import date
from importlib.metadata import version as package_version
from pathlib import Path

import polars as pl
import sqlalchemy as sa

import features
import ranking
import recsys
import training
from features import contracts
from features import store as feature_store
from ranking import registry
from ranking.candidates import CandidateConfig, SnapshotTables
from training import frames, plan, promotion
from training.gate import FittedWeek, PooledEvaluation
from training.ranker import RankerParams, TrainedRanker

log = logging.getLogger(__name__)


def plan_training(
    engine: sa.Engine,
    as_of: date,
    training_weeks: int,
    gate_weeks: int,
    validation_weeks: int,
    min_training_users: int = 0,
    max_training_weeks: int = 0,
) -> list[plan.WeekPlan]:
    """The gate's plans (`plan.plan_gate`) over the weeks whose user features and labels passed
    validation, the model trained at `as_of` last; warns when the newest of them is older than the
    week that just closed. Training weeks holding fewer than `min_training_users` labelled users widen
    to at most `max_training_weeks` (`plan.Widening`), counted in the store only when they can."""
    labelled = labelled_weeks(engine)
    widening = _widening(
        engine, labelled, as_of, training_weeks, gate_weeks, validation_weeks, min_training_users, max_training_weeks
    )
    plans = plan.plan_gate(labelled, as_of, training_weeks, gate_weeks, validation_weeks, widening)
    if (stale := plan.staleness(plans[-1])) is not None:
        log.warning(stale)
    return plans


def plan_refit(
    engine: sa.Engine,
    latest: plan.WeekPlan,
    training_weeks: int,
    gate_weeks: int,
    validation_weeks: int,
    min_training_users: int = 0,
    max_training_weeks: int = 0,
) -> plan.WeekPlan:
    """The served model's plan (`plan.plan_refit`): `latest` (the gate's last plan) refitted through its holdout,
    planned as the next week's run (`plan_training` one week later) plans its gate model of the week after."""
    labelled = [d for d in labelled_weeks(engine) if d <= latest.holdout]
    widening = _widening(
        engine, labelled, latest.holdout + plan.WEEK, training_weeks, gate_weeks, validation_weeks,
        min_training_users, max_training_weeks,
    )  # fmt: skip
    return plan.plan_refit(labelled, latest, training_weeks, validation_weeks, widening)


def labelled_weeks(engine: sa.Engine) -> list[date]:
    """The weeks whose user features and labels both passed validation, oldest first."""
    features = set(feature_store.passed_as_ofs(engine, contracts.USER_FEATURES.name))
    return [d for d in feature_store.passed_as_ofs(engine, contracts.LABELS.name) if d in features]


def _widening(
    engine: sa.Engine,
    labelled: list[date],
    as_of: date,
    training_weeks: int,
    gate_weeks: int,
    validation_weeks: int,
    min_training_users: int,
    max_training_weeks: int,
) -> plan.Widening | None:
    if not plan.widens(training_weeks, min_training_users, max_training_weeks):
        return None
    # No plan reaches further back than the oldest gate holdout's validation and widest training weeks.
    usable = [d for d in labelled if d + plan.WEEK <= as_of]
    reach = usable[-(gate_weeks + validation_weeks + max_training_weeks) :]
    # Counted up to min_training_users: a week holding that many alone meets it, so the plan is the same.
    users = feature_store.count_labelled_users(engine, reach, at_most=min_training_users)
    return plan.Widening(users=users, min_users=min_training_users, max_weeks=max_training_weeks)


def read_tables(engine: sa.Engine, as_of: date, user_ids: Sequence[int] | None = None) -> SnapshotTables:
    """The feature tables (`contracts.FEATURE_TABLES`) of one passed snapshot; with `user_ids`, the
    user-keyed tables hold only those users' rows (item-keyed tables are read whole)."""
    return SnapshotTables.from_frames(
        {
            t.name: feature_store.read_table(
                engine, t.name, as_of, user_ids=user_ids if "user_id" in t.column_names else None
            )
            for t in contracts.FEATURE_TABLES
        }
    )


def encoding_week(engine: sa.Engine, refit: plan.WeekPlan) -> date:
    """The snapshot whose categories encode the refit (`plan_refit`): its holdout's, which the next week's run
    encodes its gate model of that week with, when the item features of that week passed (the feature flow
    writes them a week before its labels); else its newest training week's."""
    passed = set(feature_store.passed_as_ofs(engine, contracts.ITEM_FEATURES.name))
    return refit.holdout if refit.holdout in passed else refit.validation[-1]


def read_labels(engine: sa.Engine, as_of: date) -> pl.DataFrame:
    return feature_store.read_table(engine, contracts.LABELS.name, as_of)


def read_sampled_week(
    engine: sa.Engine, as_of: date, sample: Callable[[pl.Series], pl.Series]
) -> tuple[SnapshotTables, pl.DataFrame]:
    """One labelled week restricted to `sample(labelled users)`: its tables (only those users' rows in
    the user-keyed ones) and their labels. The labelled users (a new item that week and history
    before it) come from the labels and the user ids alone, so the week is never read whole.

    `sample` must keep the users it drew when given only them (`frames.sample_users` and
    `evaluation.sample_holdout_users` do): then training frames and evaluations of the restricted
    week equal those of the whole week.
    """
    labels = read_labels(engine, as_of)
    known = feature_store.read_table(engine, contracts.USER_FEATURES.name, as_of, columns=["user_id"])
    users = sample(frames.labelled_users(labels, known))
    labels = labels.join(users.to_frame("user_id"), on="user_id", how="semi")
    return read_tables(engine, as_of, user_ids=users.to_list()), labels


def read_item_features(engine: sa.Engine, as_of: date) -> pl.DataFrame:
    return feature_store.read_table(engine, contracts.ITEM_FEATURES.name, as_of)


def snapshot_digests(engine: sa.Engine, weeks: list[date]) -> dict[str, str]:
    """Lineage: the digest of every passed feature and label table of `weeks`, as `table@as_of`,
    and the raw source each week's features were computed from, as `source@as_of`."""
    summary = pl.concat(
        [feature_store.snapshot_summary(engine, w).with_columns(pl.lit(w).alias("as_of")) for w in weeks]
    )
    digests = {f"{r['table_name']}@{r['as_of']}": r["digest"] for r in summary.iter_rows(named=True) if r["passed"]}
    sources = feature_store.snapshot_sources(engine, weeks)
    return digests | {f"source@{w}": s for w, s in sources.items() if s is not None}


def register_and_gate(
    engine: sa.Engine,
    name: str,
    model: TrainedRanker,
    plans: list[plan.WeekPlan],
    pooled: PooledEvaluation,
    *,
    refit: plan.WeekPlan,
    recipe: str,
    categories: list[str],
    config: CandidateConfig,
    k: int,
    margin: float,
    flow_run_id: str | None,
) -> tuple[int, promotion.Decision, registry.ModelRecord]:
    """Register the model (the gate's recipe refitted through the newest holdout, on `refit`'s training and
    validation weeks) with the gate's pooled evaluation of `plans` and its lineage and, only if it passes the
    gate, as champion (one transaction). When the gate leaves a baseline to serve, register that baseline as a
    version and make it champion (one transaction). `recipe` (`recipe_key`) tells a refresh of the champion's
    recipe from a new one (`promotion.decide`).

    Returns the model's version, the gate's decision and the champion live afterwards.
    """
    held = registry.get_champion(engine, name)
    trained = held is not None and held.kind == "ranker"
    decision = promotion.decide(
        pooled.metrics,
        pooled.gains,
        metric=f"ndcg@{k}",
        margin=margin,
        champion_baseline=held.params["baseline"] if held is not None and held.kind == "baseline" else None,
        weeks=pooled.weeks,
        champion_through=trained_through(held) if trained else None,
        champion_weeks=pooled.champion_weeks,
        refresh=trained and held.params.get("recipe") == recipe,
    )
    lineage = {
        "as_of": plans[-1].as_of,
        "validation_as_of": refit.validation[-1],
        "holdout_as_of": None,  # trained through the gate's newest holdout: its evidence is the gate's weeks
        "feature_snapshots": snapshot_digests(
            engine, sorted({w for p in plans for w in p.weeks} | {*refit.train, *refit.validation})
        ),
        "flow_run_id": flow_run_id,
        "code_version": package_version("weekly-recs"),
        "actor": "training-flow",
    }
    gate = {"candidate_recall": pooled.candidate_recall, "gains": pooled.gains_record(),
            "gate_weeks": [str(w) for w in pooled.weeks],
            "champion_weeks": [str(w) for w in pooled.champion_weeks]}  # fmt: skip
    version = registry.register_model(
        engine,
        name=name,
        model_text=model.model_text,
        feature_names=model.feature_names,
        encodings={"category": categories},
        params=model.params | {"best_iteration": model.best_iteration, "candidates": asdict(config), "recipe": recipe},
        metrics=pooled.metrics | gate,
        training_as_ofs=refit.train,
        status="registered" if decision.promote else "rejected",
        decision=decision,
        promote_reason=decision.reason if decision.promote else None,
        **lineage,
    )
    if decision.serve_baseline is not None:
        registry.register_model(
            engine,
            name=name,
            kind="baseline",
            model_text="",
            feature_names=[],
            encodings={},
            params={"baseline": decision.serve_baseline, "candidates": asdict(config)},
            # The version's own numbers under "model", as for a ranker; the rest is the same pooled evaluation.
            metrics=pooled.metrics | gate | {"model": pooled.metrics[decision.serve_baseline]},
            training_as_ofs=[],
            decision=decision,
            promote_reason=decision.reason,
            **lineage,
        )
    return version, decision, registry.get_champion(engine, name)


def trained_through(record: registry.ModelRecord) -> date | None:
    """The last week a trained model learnt from (its validation weeks early-stopped and refitted it): the gate
    compares it only on later weeks. None for a record with no week (a baseline)."""
    weeks = [*record.training_as_ofs, *([record.validation_as_of] if record.validation_as_of else [])]
    return max(weeks) if weeks else None


def recipe_key(recipe: dict) -> str:
    """The recipe a model is trained by (`recipe`: the settings of its plan, parameters, tuning, candidates and
    sampling; `flows.configs.recipe`) and the released code version, hashed: equal keys mark a refit of the same
    recipe on newer weeks, which may replace the champion without beating it (`promotion.decide`)."""
    content = {"recipe": recipe, "code_version": package_version("weekly-recs")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


# Gate models kept for reuse, the most recently used first: a weekly run reuses at most RECSYS_GATE_WEEKS - 1 of
# them, so this holds many weeks of several model settings (a MovieLens model text is ≈ 0.3 MB).
GATE_MODELS_KEPT = 64

_GATE_MODELS_DDL = """
create table if not exists gate_models (
    key text primary key,
    holdout_as_of date not null,
    model_text text not null,
    model_sha256 text not null,
    feature_names jsonb not null,
    best_iteration integer not null,
    params jsonb not null,
    feature_importance jsonb not null,
    validation_ndcg double precision not null,
    train_rows bigint not null,
    valid_rows bigint not null,
    created_at timestamptz not null default now(),
    used_at timestamptz not null default now()
)
"""


def ensure_schema(engine: sa.Engine) -> None:
    """The registry's tables and the gate models' (`keep_gate_model`), created if missing; safe when several
    processes call it at once."""
    registry.ensure_schema(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("select pg_advisory_xact_lock(hashtext('weekly-recs gate models'), 0)"))
        conn.execute(sa.text(_GATE_MODELS_DDL))


def gate_model_key(
    engine: sa.Engine,
    week_plan: plan.WeekPlan,
    categories: list[str],
    *,
    config: CandidateConfig,
    params: RankerParams,
    sampling: dict,
) -> str:
    """What a gate week's model is a function of, hashed: its training and validation weeks, the digest of
    every table (labels too) and the raw source of those weeks, the category encoding, the candidate counts,
    LightGBM's parameters, the frames' sampling, and the code and libraries that build frames and fit
    (`code_fingerprint`). Two runs with the same key train byte-identical models (the training flow's
    determinism test), so the second may reuse the first's."""
    weeks = [*week_plan.train, *week_plan.validation]
    content = {
        "train": [str(w) for w in week_plan.train],
        "validation": [str(w) for w in week_plan.validation],
        "snapshots": snapshot_digests(engine, weeks),
        "categories": categories,
        "candidates": asdict(config),
        "params": asdict(params),
        "sampling": sampling,
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """The fingerprint (`source_fingerprint`) of every package a trained model depends on and of the libraries
    that compute it: an edit to any of them, released or not, gives new keys, so no model trained by other
    code is reused."""
    packages = [Path(package.__file__).parent for package in (features, ranking, recsys, training)]
    return source_fingerprint(packages, ("weekly-recs", "lightgbm", "polars", "numpy", "scipy", "implicit"))


def source_fingerprint(packages: Sequence[Path], libraries: Sequence[str]) -> str:
    """sha256 of the path and content of every .py file under `packages` and of the installed `libraries`' versions."""
    digest = hashlib.sha256()
    for root in packages:
        for source in sorted(root.rglob("*.py")):
            digest.update(str(source.relative_to(root.parent)).encode() + b"\0" + source.read_bytes() + b"\0")
    for library in libraries:
        digest.update(f"{library}=={package_version(library)}\0".encode())
    return digest.hexdigest()


def has_gate_model(engine: sa.Engine, key: str) -> bool:
    """Whether a model is kept under `key` (`keep_gate_model`)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text("select exists (select 1 from gate_models where key = :key)"), {"key": key}
        ).scalar()


def reused_gate_model(engine: sa.Engine, key: str) -> FittedWeek | None:
    """The model an earlier run trained under `key` (`gate_model_key`), marked used; None when there is none,
    or when its text no longer matches the sha256 stored with it (then it is trained again; a warning says so)."""
    with engine.begin() as conn:
        row = conn.execute(
            sa.text("update gate_models set used_at = now() where key = :key returning *"), {"key": key}
        ).mappings().first()  # fmt: skip
    if row is None:
        return None
    if hashlib.sha256(row["model_text"].encode()).hexdigest() != row["model_sha256"]:
        log.warning("gate model %s (holdout %s) does not match its sha256: trained again", key, row["holdout_as_of"])
        return None
    model = TrainedRanker(
        model_text=row["model_text"],
        feature_names=list(row["feature_names"]),
        best_iteration=row["best_iteration"],
        params=row["params"],
        feature_importance=row["feature_importance"],
        validation_ndcg=row["validation_ndcg"],
    )
    return FittedWeek(model, row["train_rows"], row["valid_rows"])


def keep_gate_model(engine: sa.Engine, key: str, holdout: date, fitted: FittedWeek) -> None:
    """Store a gate week's trained model (or the served refit, kept for the next run's gate week `holdout`) under
    `key` for later runs; only the GATE_MODELS_KEPT most recently used stay."""
    model = fitted.model
    values = {
        "key": key, "holdout": holdout, "text": model.model_text, "names": json.dumps(model.feature_names),
        "sha": hashlib.sha256(model.model_text.encode()).hexdigest(),
        "best": model.best_iteration, "params": json.dumps(model.params), "train": fitted.train_rows,
        "importance": json.dumps(model.feature_importance), "valid": fitted.valid_rows,
        "ndcg": model.validation_ndcg,
    }  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                """
                insert into gate_models (key, holdout_as_of, model_text, model_sha256, feature_names, best_iteration,
                                         params, feature_importance, validation_ndcg, train_rows, valid_rows)
                values (:key, :holdout, :text, :sha, cast(:names as jsonb), :best, cast(:params as jsonb),
                        cast(:importance as jsonb), :ndcg, :train, :valid)
                on conflict (key) do update set model_text = excluded.model_text, model_sha256 = excluded.model_sha256,
                                                used_at = now()
                """
            ),
            values,
        )
        conn.execute(
            sa.text(
                "delete from gate_models where key not in "
                "(select key from gate_models order by used_at desc, created_at desc limit :kept)"
            ),
            {"kept": GATE_MODELS_KEPT},
        )
