"""Why one user got their list: history, candidates and their sources, the model's reasons.

`explain_user` is the pure core (snapshot tables in, a JSON-ready dict out); `explain` finds
the snapshot, the champion, the week's labels and the published list in the stores, as the
inference flow would, and changes nothing.
"""

import logging
from collections.abc import Callable
from datetime import date

import numpy as np
import polars as pl
import redis
import sqlalchemy as sa

from features import contracts, store
from inference import scoring, serving
from ranking import registry
from ranking.candidates import (
    PRIOR_FEATURE,
    SOURCES,
    CandidateConfig,
    SnapshotTables,
    build_ranking_frame,
    category_encoding,
    with_stored_counts,
)
from ranking.scoring import ScoringModel, check_model, feature_matrix, prior_scores, score, top_n

log = logging.getLogger(__name__)

NO_MODEL_ORDER = PRIOR_FEATURE  # recent popularity: the model's starting score and the best plain baseline


class UnknownUserError(LookupError):
    """The user has no row in the feature snapshot being explained."""


def explain_user(
    tables: SnapshotTables,
    user_id: int,
    model: ScoringModel | None,
    config: CandidateConfig,
    n: int,
    labels: pl.DataFrame | None = None,
    top_features: int = 5,
) -> dict:
    """One user's recent history, every candidate (sources, ranks, score and the features that
    moved it most), the top-n as ranked, and, given the week's `labels`, where each newly
    consumed item ranked among the candidates (rank None: not a candidate).

    A candidate's score is `prior + bias + sum(contributions) + other_contributions`: the prior
    the trees start from, plus the trees' per-row feature contributions (LightGBM's
    `pred_contrib`), the `top_features` largest listed one by one. Without a model the
    candidates are ranked by that prior alone (recent popularity).
    """
    user = pl.Series("user_id", [user_id], pl.Int64)
    categories = model.categories if model is not None else category_encoding(tables.item_features)
    frame = build_ranking_frame(tables, user, config, categories)
    ranked = _rank(frame, model)
    items = tables.item_features.select("item_id", "category", "creator")
    candidates = [
        _describe_candidate(row, model, reasons, top_features)
        for row, reasons in zip(
            ranked.join(items, on="item_id", how="left", maintain_order="left").iter_rows(named=True),
            _explain_scores(ranked, model),
            strict=True,
        )
    ]
    notes = []
    if model is None:
        notes.append("no model: candidates are ranked by recent popularity (the model's prior), without scores")
    profile = tables.user_features.filter(pl.col("user_id") == user_id)
    if profile.is_empty():
        notes.append(f"user {user_id} has no features in this snapshot (cold user): only item-side candidates")
    if not candidates:
        notes.append(f"user {user_id} has no candidate left: they get the fallback list")
    history = tables.user_item_history.filter(pl.col("user_id") == user_id)
    return {
        "user_id": user_id,
        "user": None if profile.is_empty() else profile.drop("as_of", "user_id").row(0, named=True),
        "history_items": history.height,
        "history": _recent_history(history, items, config.recent_items),
        "candidates": candidates,
        "recommended": [{"rank": c["rank"], "item_id": c["item_id"], "score": c["score"]} for c in candidates[:n]],
        "consumed": None if labels is None else _consumed(labels, user_id, candidates, n),
        "notes": notes,
    }


def _rank(frame: pl.DataFrame, model: ScoringModel | None) -> pl.DataFrame:
    """The candidate frame with `score` (None without a model) and `rank`, best first, as inference orders it."""
    if model is None:
        scored = frame.with_columns(pl.lit(None, pl.Float64).alias("score"))
        order = top_n(frame, frame.height, score_column=NO_MODEL_ORDER)
    else:
        scored = score(model.booster, frame, model.feature_names)
        order = top_n(scored, frame.height)
    return order.select("item_id", "rank").join(scored, on="item_id", maintain_order="left")


def _explain_scores(ranked: pl.DataFrame, model: ScoringModel | None) -> list[tuple[list[float], float, float] | None]:
    """Per row: the trees' contribution of each model feature, their bias and the prior; None without a model."""
    if model is None or ranked.is_empty():
        return [None] * ranked.height
    contributions = model.booster.predict(feature_matrix(ranked, model.feature_names), pred_contrib=True, num_threads=1)
    prior = prior_scores(ranked, model.feature_names)
    priors = np.zeros(ranked.height) if prior is None else prior
    # LightGBM puts the bias (the trees' expected value) in the last column.
    return [(row[:-1].tolist(), float(row[-1]), float(p)) for row, p in zip(contributions, priors, strict=True)]


def _describe_candidate(row: dict, model: ScoringModel | None, reasons: tuple | None, top_features: int) -> dict:
    candidate = {
        "rank": row["rank"],
        "item_id": row["item_id"],
        "category": row["category"],
        "creator": row["creator"],
        "score": row["score"],
        "sources": {s: row[f"{s}_rank"] for s in SOURCES if row[f"{s}_rank"] is not None},
        "cooc_score": row["cooc_score"],
    }
    if reasons is None:
        return candidate
    by_feature, bias, prior = reasons
    strongest = sorted(range(len(by_feature)), key=lambda i: (-abs(by_feature[i]), i))[:top_features]
    return candidate | {
        "prior": prior,
        "bias": bias,
        "contributions": [
            {"feature": model.feature_names[i], "value": row[model.feature_names[i]], "contribution": by_feature[i]}
            for i in strongest
        ],
        # So that prior + bias + contributions + other_contributions is the score.
        "other_contributions": sum(by_feature) - sum(by_feature[i] for i in strongest),
    }


def _recent_history(history: pl.DataFrame, items: pl.DataFrame, limit: int) -> list[dict]:
    """The user's `limit` most recent items (those co-occurrence candidates come from), most recent first."""
    return (
        history.sort(["days_since_last_event", "events", "item_id"], descending=[False, True, False])
        .head(limit)
        .join(items, on="item_id", how="left", maintain_order="left")
        .select("item_id", "category", "creator", "events", "weight", pl.col("days_since_last_event").alias("days_ago"))
        .to_dicts()
    )


def _consumed(labels: pl.DataFrame, user_id: int, candidates: list[dict], n: int) -> list[dict]:
    """Each item the user consumed that week for the first time, with its candidate rank (None: not a candidate)."""
    contracts.require_columns(labels.columns, ["user_id", "item_id", "events", "is_new"], "labels")
    by_item = {c["item_id"]: c for c in candidates}
    new = labels.filter(pl.col("user_id") == user_id, pl.col("is_new")).sort("item_id")
    found = []
    for item_id, events in new.select("item_id", "events").iter_rows():
        candidate = by_item.get(item_id)
        rank = None if candidate is None else candidate["rank"]
        found.append(
            {
                "item_id": item_id,
                "events": events,
                "candidate": candidate is not None,
                "rank": rank,
                "in_top_n": rank is not None and rank <= n,
                "sources": None if candidate is None else candidate["sources"],
            }
        )
    return sorted(found, key=lambda c: (c["rank"] is None, c["rank"] or 0, c["item_id"]))


# --- the stores ---


def live_as_of(client: redis.Redis, prefix: str) -> date | None:
    """The week of the live publication under `prefix`, or None when nothing is published."""
    keys = serving.client_keys(client, prefix)
    version = client.get(keys.live)
    week = None if version is None else client.hget(keys.meta(version), "as_of")
    return None if week is None else date.fromisoformat(week)


def explain(
    engine: sa.Engine,
    redis_client: redis.Redis,
    prefix: str,
    user_id: int,
    as_of: date,
    config: CandidateConfig,
    n: int,
    *,
    model_name: str,
    archived_list: Callable[[int, date], list[int] | None] | None = None,
) -> dict:
    """`explain_user` for week `as_of` from the stores, plus what was published for that week.

    Uses the newest passed feature snapshot at or before `as_of` and the champion of
    `model_name`, as the inference flow does; the labels of week `as_of` when they exist;
    the live list from Redis when the live publication is for `as_of`, otherwise the list
    `archived_list(user_id, as_of)` returns (the hook for the archive of past weeks; without
    it, no list). Raises SnapshotUnavailable without a snapshot and UnknownUserError when the
    user is not in it; without a champion the candidates are explained without scores.
    """
    snapshot = scoring.find_snapshot(engine, as_of)
    users = [user_id]
    user_tables = {c.name: store.read_table(engine, c.name, snapshot, user_ids=users) for c in scoring.USER_TABLES}
    if user_tables[contracts.USER_FEATURES.name].is_empty():
        raise UnknownUserError(
            f"user {user_id} is not in the feature snapshot as_of {snapshot} (no event before {snapshot}): "
            "they get the fallback list; check the id, or explain a later week"
        )
    item_tables = {c.name: store.read_table(engine, c.name, snapshot) for c in scoring.ITEM_TABLES}
    tables = SnapshotTables.from_frames(user_tables | item_tables)
    model, model_info, notes = _load_champion(engine, model_name, config)
    labels = None
    if as_of in store.passed_as_ofs(engine, contracts.LABELS.name):
        labels = store.read_table(engine, contracts.LABELS.name, as_of, user_ids=users)
    else:
        notes.append(f"no labels for the week of {as_of} yet (the week is not over, or its features were not run)")
    if snapshot < as_of:
        notes.append(f"the newest passed feature snapshot is {snapshot}, older than the week {as_of}")
    explained = explain_user(tables, user_id, model, model.config if model else config, n, labels)
    published, published_note = _published_list(redis_client, prefix, user_id, as_of, archived_list)
    if published is not None:
        published["same_as_explained"] = published["items"] == [r["item_id"] for r in explained["recommended"]]
    log.info("explained user %d for the week of %s (features as of %s)", user_id, as_of, snapshot)
    return {
        "user_id": user_id,
        "as_of": as_of,
        "feature_as_of": snapshot,
        "model": model_info,
        "published": published,
        **{k: v for k, v in explained.items() if k != "user_id"},
        "notes": [*notes, *([published_note] if published_note else []), *explained["notes"]],
    }


def _load_champion(
    engine: sa.Engine, model_name: str, config: CandidateConfig
) -> tuple[ScoringModel | None, dict | None, list[str]]:
    """The champion as a ScoringModel with the candidate counts it was trained on (`config`'s otherwise; None
    without one, or when it is not a LightGBM model), its summary, notes."""
    # Read-only: a database where no model was ever registered has no registry tables yet.
    record = registry.get_champion(engine, model_name) if sa.inspect(engine).has_table("model_aliases") else None
    if record is None:
        return None, None, [f"model {model_name} has no champion: no model has been trained yet (recsys train)"]
    info = {"name": record.name, "version": record.version, "status": record.status, "as_of": record.as_of}
    if record.kind != "ranker":
        return None, info, [f"champion {record.name} v{record.version} is not a LightGBM model: no scores to explain"]
    booster, record = registry.load_model(engine, model_name, record.version)
    check_model(record.feature_names, record.encodings, f"{record.name} v{record.version}")
    scoring_model = ScoringModel(
        booster, record.feature_names, record.encodings["category"], with_stored_counts(config, record.params)
    )
    return scoring_model, info, []


def _published_list(
    client: redis.Redis,
    prefix: str,
    user_id: int,
    as_of: date,
    archived_list: Callable[[int, date], list[int] | None] | None,
) -> tuple[dict | None, str | None]:
    """The list the user got for week `as_of`, and a note when there is none to show."""
    try:
        (live,) = serving.get_recommendations(client, prefix, [user_id])
    except serving.NoPublicationError:
        live = None
    if live is not None and live.as_of == as_of:
        published = {"source": "live", "version": live.version, "model_version": live.model_version}
        return published | {"items": live.items, "fallback": live.is_fallback}, None
    items = None if archived_list is None else archived_list(user_id, as_of)
    if items is not None:
        return {"source": "archive", "items": items}, None
    live_week = "nothing is published" if live is None else f"the live publication is for the week of {live.as_of}"
    archive = "past weeks' lists are not archived yet" if archived_list is None else "the archive has no list for it"
    return None, f"no published list for the week of {as_of}: {live_week}, and {archive}"
