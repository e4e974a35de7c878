"""The model registry in Postgres: versions with lineage and metrics, aliases with history.

Tables (created by `ensure_schema`):

- `model_versions`: one row per (name, version): its kind, training window, feature
  snapshots used (table -> digest), feature names and encodings (so inference encodes
  exactly as training did), params, metrics, the promotion decision, the model as
  LightGBM text with its sha256, the flow run and code version that produced it.
- `model_aliases`: (name, alias) -> version, e.g. `champion`.
- `model_alias_history`: every alias change with who, when and why; append-only (a
  trigger refuses updates and deletes).

`metrics` holds the gate's numbers pooled over its weeks (micro-averaged over (user, week)),
one entry per recommender plus the candidates' recall, the model's gain over each other
recommender with its bootstrap interval, and the weeks: `{"model": {...}, "recent_popular":
{...}, "all_time_popular": {...}, "item_knn": {...}, "ease": {...}, "als": {...}, "champion":
{...} (only when there was one), "candidate_recall": {...}, "gains": {"ease": {"gain", "low",
"high", "units", "confidence", "model", "other"}, ...}, "gate_weeks": [...]}`, each
recommender's entry as `ranking.metrics.rank_metrics` returns it (`users` counts (user, week) units).

A version's status is one of:

- `registered`: stored and eligible for an alias (the gate passed, or has not run);
- `rejected`: the promotion gate refused it; aliases refuse it unless forced;
- `champion`: holds the champion alias now;
- `retired`: held the champion alias before and was replaced (rollback can restore it).

A version's kind is `ranker` (a LightGBM model) or `baseline` (params `{"baseline": name}`,
one of `ranking.baselines.NAMES`, served as champion until a model wins the gate; no model text).
Rankers are stored and loaded as LightGBM text only, never pickled: `load_model` checks
the sha256 and the text's shape before LightGBM parses anything.
"""

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import polars as pl
import sqlalchemy as sa

if TYPE_CHECKING:
    import lightgbm as lgb

from recsys.errors import ExpectedError

log = logging.getLogger(__name__)

CHAMPION = "champion"
STATUSES = ("registered", "rejected", "champion", "retired")
KINDS = ("ranker", "baseline")
_REGISTRABLE = ("registered", "rejected")
_LOCK_SPACE = "weekly-recs.registry"

_DDL = (
    f"""
    create table if not exists model_versions (
        name text not null,
        version integer not null check (version >= 1),
        created_at timestamptz not null default now(),
        status text not null check (status in ({", ".join(f"'{s}'" for s in STATUSES)})),
        as_of date not null,
        training_as_ofs date[] not null,
        validation_as_of date,
        holdout_as_of date,
        feature_snapshots jsonb not null,
        feature_names jsonb not null,
        encodings jsonb not null,
        params jsonb not null,
        metrics jsonb not null,
        decision jsonb,
        model_text text not null,
        model_sha256 text not null,
        flow_run_id text,
        code_version text,
        primary key (name, version)
    )
    """,
    """
    create table if not exists model_aliases (
        name text not null,
        alias text not null,
        version integer not null,
        updated_at timestamptz not null default now(),
        primary key (name, alias),
        foreign key (name, version) references model_versions (name, version)
    )
    """,
    """
    create table if not exists model_alias_history (
        id bigserial primary key,
        name text not null,
        alias text not null,
        from_version integer,
        to_version integer not null,
        changed_at timestamptz not null default now(),
        reason text not null,
        actor text not null
    )
    """,
    f"""
    alter table model_versions add column if not exists kind text not null default 'ranker'
        check (kind in ({", ".join(f"'{k}'" for k in KINDS)}))
    """,
    """
    create index if not exists model_alias_history_by_alias
        on model_alias_history (name, alias, id)
    """,
    """
    create or replace function model_alias_history_refuse_change() returns trigger
    language plpgsql as $$
    begin
        raise exception 'model_alias_history is append-only: % refused', tg_op;
    end
    $$
    """,
    """
    create or replace trigger model_alias_history_append_only
        before update or delete on model_alias_history
        for each row execute function model_alias_history_refuse_change()
    """,
)


class ModelIntegrityError(Exception):
    """A stored model text is not the one registered, or is not a LightGBM text model."""


class ModelNotFoundError(ExpectedError, LookupError):
    """No such model version (or no champion) in the registry."""


class AliasChangeError(ExpectedError, ValueError):
    """An alias change was refused: rejected version, or nothing to roll back to."""


@dataclass(frozen=True)
class ModelRecord:
    """Everything the registry knows about one model version, except the model text.

    Inference builds a record that is not in the registry (version None) for the default
    baseline it serves before any training run succeeded.
    """

    name: str
    version: int | None
    created_at: datetime | None
    status: str
    as_of: date | None
    training_as_ofs: list[date]
    validation_as_of: date | None
    holdout_as_of: date | None
    feature_snapshots: dict[str, Any]
    feature_names: list[str]
    encodings: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, Any]
    decision: dict[str, Any] | None
    model_sha256: str
    flow_run_id: str | None
    code_version: str | None
    kind: str = "ranker"

    @property
    def label(self) -> str:
        """What served, as publications name it: `name:version`, plus the baseline a baseline serves."""
        if self.kind == "ranker":
            return f"{self.name}:{self.version}"
        if self.version is None:
            return f"{self.name} (no champion yet)"
        return f"{self.name}:{self.version} (baseline {self.params['baseline']})"


_RECORD_COLUMNS = ", ".join(f"v.{f.name}" for f in fields(ModelRecord))


def ensure_schema(engine: sa.Engine) -> None:
    """Create the registry tables if missing; safe when several processes call it at once."""
    with engine.begin() as conn:
        conn.execute(sa.text("select pg_advisory_xact_lock(hashtext(:space), 0)"), {"space": _LOCK_SPACE})
        for statement in _DDL:
            conn.execute(sa.text(statement))


def register_model(
    engine: sa.Engine,
    *,
    name: str,
    model_text: str,
    feature_names: list[str],
    encodings: dict[str, Any],
    params: dict[str, Any],
    metrics: dict[str, Any],
    as_of: date,
    training_as_ofs: list[date],
    validation_as_of: date | None,
    holdout_as_of: date | None,
    feature_snapshots: dict[str, str],
    flow_run_id: str | None = None,
    code_version: str | None = None,
    status: str = "registered",
    decision: Any = None,
    promote_reason: str | None = None,
    actor: str = "training-flow",
    kind: str = "ranker",
) -> int:
    """Store a new version of model `name` and return its number (1 for the first).

    With `promote_reason`, the new version also becomes champion in the same transaction:
    a crash can leave no registered model that was meant to be champion and is not.
    A `baseline` version has params `{"baseline": name}` and an empty model text.
    """
    if promote_reason is not None:
        _require_words(reason=promote_reason, actor=actor)
    if status not in _REGISTRABLE:
        raise ValueError(
            f"register_model {name}: status must be one of {_REGISTRABLE}, got {status!r}"
            " (champion is set through promote)"
        )
    problem = _kind_problem(kind, model_text, feature_names, params)
    if problem:
        raise ValueError(f"register_model {name}: {problem}")
    if is_dataclass(decision):  # the gate's Decision (training.promotion); unset optional fields are left out
        decision = {key: value for key, value in asdict(decision).items() if value is not None}
    documents = {
        "feature_snapshots": feature_snapshots,
        "feature_names": list(feature_names),
        "encodings": encodings,
        "params": params,
        "metrics": metrics,
        "decision": decision,
    }
    values = {key: _to_json(name, key, value) for key, value in documents.items()}
    values |= {
        "name": name,
        "kind": kind,
        "status": status,
        "as_of": as_of,
        "training_as_ofs": list(training_as_ofs),
        "validation_as_of": validation_as_of,
        "holdout_as_of": holdout_as_of,
        "model_text": model_text,
        "model_sha256": _sha256(model_text),
        "flow_run_id": flow_run_id,
        "code_version": code_version,
    }
    with engine.begin() as conn:
        _lock(conn, name)
        version = conn.execute(
            sa.text("select coalesce(max(version), 0) + 1 from model_versions where name = :name"),
            {"name": name},
        ).scalar_one()
        conn.execute(
            sa.text(
                """
                insert into model_versions (
                    name, version, kind, status, as_of, training_as_ofs, validation_as_of,
                    holdout_as_of, feature_snapshots, feature_names, encodings, params,
                    metrics, decision, model_text, model_sha256, flow_run_id, code_version)
                values (
                    :name, :version, :kind, :status, :as_of, cast(:training_as_ofs as date[]),
                    :validation_as_of, :holdout_as_of, cast(:feature_snapshots as jsonb),
                    cast(:feature_names as jsonb), cast(:encodings as jsonb),
                    cast(:params as jsonb), cast(:metrics as jsonb), cast(:decision as jsonb),
                    :model_text, :model_sha256, :flow_run_id, :code_version)
                """
            ),
            values | {"version": version},
        )
        if promote_reason is not None:
            _move_alias(conn, name, CHAMPION, version, reason=promote_reason, actor=actor, force=False)
    log.info("registered model %s v%d (%s %s, %d bytes)", name, version, kind, status, len(model_text))
    return version


def load_model(engine: sa.Engine, name: str, version: int | None = None) -> tuple["lgb.Booster | None", ModelRecord]:
    """The booster and record of `name` at `version` (the champion when None); no booster for a baseline.

    A ranker's stored text must hash to the registered sha256 and look like a LightGBM
    text model before LightGBM parses it; otherwise ModelIntegrityError.
    """
    with engine.connect() as conn:
        row = _fetch_row(conn, name, version, with_text=True)
        if row is None:
            raise ModelNotFoundError(_not_found(name, version))
    text = row.pop("model_text")
    record = ModelRecord(**row)
    actual = _sha256(text)
    if actual != record.model_sha256:
        raise ModelIntegrityError(
            f"model {name} v{record.version}: stored text hashes to sha256 {actual}, "
            f"registered sha256 is {record.model_sha256}; refusing to load it"
        )
    if record.kind == "baseline":
        log.info("loaded model %s v%d (baseline %s)", name, record.version, record.params["baseline"])
        return None, record
    problem = _model_text_problem(text, record.feature_names)
    if problem:
        raise ModelIntegrityError(f"model {name} v{record.version}: text {problem}; refusing to load it")
    import lightgbm as lgb  # here: the registry's read commands should not pay for importing it

    booster = lgb.Booster(model_str=text)
    log.info("loaded model %s v%d (%s)", name, record.version, record.status)
    return booster, record


def get_model(engine: sa.Engine, name: str, version: int) -> ModelRecord:
    """The record of one version; ModelNotFoundError when it does not exist."""
    with engine.connect() as conn:
        row = _fetch_row(conn, name, version, with_text=False)
    if row is None:
        raise ModelNotFoundError(_not_found(name, version))
    return ModelRecord(**row)


def get_champion(engine: sa.Engine, name: str) -> ModelRecord | None:
    """The record of the version holding the champion alias, or None before any promotion."""
    with engine.connect() as conn:
        row = _fetch_row(conn, name, None, with_text=False)
    return None if row is None else ModelRecord(**row)


def list_models(engine: sa.Engine, name: str) -> pl.DataFrame:
    """One row per version: version, created_at, kind, status, as_of, holdout_as_of, is_champion,
    `evaluated_on` (the holdout week, else the gate weeks its metrics were pooled over: a refit holds
    no week out and carries the evidence of the gate it passed), then the model's own metrics
    (metrics["model"]) as float columns."""
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.text(
                    """
                select v.version, v.created_at, v.kind, v.status, v.as_of, v.holdout_as_of,
                       a.version is not null as is_champion, v.metrics
                from model_versions v
                left join model_aliases a
                  on a.name = v.name and a.alias = :champion and a.version = v.version
                where v.name = :name
                order by v.version
                """
                ),
                {"name": name, "champion": CHAMPION},
            )
            .mappings()
            .all()
        )
    model_metrics = [dict(row["metrics"].get("model") or {}) for row in rows]
    metric_names = sorted({key for metrics in model_metrics for key in metrics})
    schema = {
        "version": pl.Int64,
        "created_at": pl.Datetime("us", "UTC"),
        "kind": pl.Utf8,
        "status": pl.Utf8,
        "as_of": pl.Date,
        "holdout_as_of": pl.Date,
        "is_champion": pl.Boolean,
        "evaluated_on": pl.Utf8,
    } | dict.fromkeys(metric_names, pl.Float64)
    data = [
        {key: row[key] for key in schema if key in row}
        | {"evaluated_on": evaluated_on(row["holdout_as_of"], row["metrics"].get("gate_weeks"))}
        | {m: metrics.get(m) for m in metric_names}
        for row, metrics in zip(rows, model_metrics, strict=True)
    ]
    return pl.DataFrame(data, schema=schema, orient="row")


def evaluated_on(holdout: date | None, gate_weeks: Sequence[str] | None) -> str | None:
    """'2026-11-02 … 2026-11-23 (4 weeks)' for metrics pooled over gate weeks, the holdout's date for one
    week, None for a version that was never evaluated (a baseline registered by hand, say)."""
    if gate_weeks:
        if len(gate_weeks) == 1:
            return gate_weeks[0]
        return f"{gate_weeks[0]} … {gate_weeks[-1]} ({len(gate_weeks)} weeks)"
    return None if holdout is None else str(holdout)


def history(engine: sa.Engine, name: str) -> pl.DataFrame:
    """Every alias change of model `name`, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                """
                select id, alias, from_version, to_version, changed_at, reason, actor
                from model_alias_history where name = :name order by id
                """
            ),
            {"name": name},
        ).all()
    schema = {
        "id": pl.Int64,
        "alias": pl.Utf8,
        "from_version": pl.Int64,
        "to_version": pl.Int64,
        "changed_at": pl.Datetime("us", "UTC"),
        "reason": pl.Utf8,
        "actor": pl.Utf8,
    }
    return pl.DataFrame([tuple(row) for row in rows], schema=schema, orient="row")


def set_alias(
    engine: sa.Engine,
    name: str,
    alias: str,
    version: int,
    *,
    reason: str,
    actor: str,
    force: bool = False,
) -> int | None:
    """Point `alias` at `version` in one transaction, recording who and why.

    Refuses an unknown version always, and a rejected one unless `force`. Returns the
    version the alias pointed at before (None if it was new). Pointing an alias at the
    version it already holds changes nothing and records nothing.
    """
    _require_words(reason=reason, actor=actor)
    with engine.begin() as conn:
        _lock(conn, name)
        return _move_alias(conn, name, alias, version, reason=reason, actor=actor, force=force)


def promote(engine: sa.Engine, name: str, version: int, *, reason: str, actor: str, force: bool = False) -> int | None:
    """Make `version` the champion of `name`; returns the previous champion's version."""
    return set_alias(engine, name, CHAMPION, version, reason=reason, actor=actor, force=force)


def rollback(engine: sa.Engine, name: str, *, reason: str, actor: str, alias: str = CHAMPION) -> int:
    """Undo the last change of `alias`: point it back at the version it held before.

    The rollback is itself a change in the history, so rolling back twice re-applies
    the change. Returns the version the alias now points at.
    """
    _require_words(reason=reason, actor=actor)
    with engine.begin() as conn:
        _lock(conn, name)
        last = conn.execute(
            sa.text(
                """
                select from_version, to_version from model_alias_history
                where name = :name and alias = :alias order by id desc limit 1
                """
            ),
            {"name": name, "alias": alias},
        ).one_or_none()
        if last is None or last.from_version is None:
            raise AliasChangeError(f"model {name}: alias {alias!r} has no earlier version to roll back to")
        # The earlier version held this alias before, so a past rejection does not block it.
        _move_alias(conn, name, alias, last.from_version, reason=reason, actor=actor, force=True)
    return last.from_version


def _move_alias(
    conn: sa.Connection,
    name: str,
    alias: str,
    version: int,
    *,
    reason: str,
    actor: str,
    force: bool,
) -> int | None:
    target = conn.execute(
        sa.text("select status, decision from model_versions where name = :name and version = :v"),
        {"name": name, "v": version},
    ).one_or_none()
    if target is None:
        raise ModelNotFoundError(f"model {name} v{version} is not registered; alias {alias!r} unchanged")
    if target.status == "rejected" and not force:
        why = (target.decision or {}).get("reason", "no reason recorded")
        raise AliasChangeError(
            f"model {name} v{version} was rejected ({why}); "
            f"pass --force (recsys models promote) or force=True to point {alias!r} at it anyway"
        )
    current = conn.execute(
        sa.text("select version from model_aliases where name = :name and alias = :alias"),
        {"name": name, "alias": alias},
    ).scalar_one_or_none()
    if current == version:
        log.info("model %s: alias %s already at v%d; nothing to change", name, alias, version)
        return current
    params = {"name": name, "alias": alias, "old": current, "new": version}
    conn.execute(
        sa.text(
            """
            insert into model_aliases (name, alias, version) values (:name, :alias, :new)
            on conflict (name, alias) do update set version = excluded.version, updated_at = now()
            """
        ),
        params,
    )
    conn.execute(
        sa.text(
            """
            insert into model_alias_history (name, alias, from_version, to_version, reason, actor)
            values (:name, :alias, :old, :new, :reason, :actor)
            """
        ),
        params | {"reason": reason, "actor": actor},
    )
    if alias == CHAMPION:
        conn.execute(
            sa.text(
                """
                update model_versions
                set status = case when version = :new then 'champion' else 'retired' end
                where name = :name and (version = :new or version = :old)
                """
            ),
            params,
        )
    log.info("model %s: %s v%s -> v%d by %s: %s", name, alias, current, version, actor, reason)
    return current


def _fetch_row(conn: sa.Connection, name: str, version: int | None, *, with_text: bool) -> dict[str, Any] | None:
    columns = _RECORD_COLUMNS + (", v.model_text" if with_text else "")
    if version is None:
        query = f"""
            select {columns} from model_versions v
            join model_aliases a on a.name = v.name and a.version = v.version
            where v.name = :name and a.alias = :champion
        """
    else:
        query = f"""
            select {columns} from model_versions v where v.name = :name and v.version = :version
        """
    row = (
        conn.execute(sa.text(query), {"name": name, "version": version, "champion": CHAMPION}).mappings().one_or_none()
    )
    return None if row is None else dict(row)


def _kind_problem(kind: str, text: str, feature_names: list[str], params: dict[str, Any]) -> str | None:
    """Why a version of `kind` cannot have this text and params, or None if it can."""
    if kind == "ranker":
        problem = _model_text_problem(text, feature_names)
        return None if problem is None else f"model_text {problem}"
    if kind != "baseline":
        return f"kind must be one of {KINDS}, got {kind!r}"
    if text or not isinstance(params.get("baseline"), str):
        return f"a baseline version has an empty model text and params {{'baseline': name}}, got params {params}"
    return None


def _model_text_problem(text: str, feature_names: list[str]) -> str | None:
    """Why `text` is not a LightGBM text model over `feature_names`, or None if it is."""
    if not text.startswith("tree\nversion=v") or "\nend of trees" not in text:
        return f"does not look like a LightGBM text model (starts with {text[:20]!r})"
    header = text.partition("\nTree=")[0].splitlines()
    declared = next((line for line in header if line.startswith("feature_names=")), None)
    if declared is None:
        return "has no feature_names line in its header"
    names = declared.removeprefix("feature_names=").split(" ")
    if names != list(feature_names):
        return f"declares features {names}, registered feature_names are {list(feature_names)}"
    return None


def _lock(conn: sa.Connection, name: str) -> None:
    """Serialise version numbering and alias changes of one model name across processes."""
    conn.execute(
        sa.text("select pg_advisory_xact_lock(hashtext(:space), hashtext(:name))"),
        {"space": _LOCK_SPACE, "name": name},
    )


def _to_json(name: str, field: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"register_model {name}: {field} is not storable as JSON ({error})") from error


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _not_found(name: str, version: int | None) -> str:
    if version is None:
        return f"model {name} has no champion; register and promote a version first"
    return f"model {name} v{version} is not registered"


def _require_words(**values: str) -> None:
    blank = [key for key, value in values.items() if not value or not value.strip()]
    if blank:
        raise ValueError(f"alias change needs a non-empty {' and '.join(blank)}")
