"""The lineage of every Redis publication in Postgres: which model and snapshot produced it.

Table `publications` (created by `ensure_schema`), one row per published version:
version (the Redis version id), as_of, model_name, model_version, model_kind (ranker or baseline),
feature_as_of, feature_source,
user_count, fallback_user_count, n, started_at, finished_at, timings (seconds per step),
status (writing, live, held, stale, failed or abandoned), error (why a run failed or was held), the flow
run id and checks (`inference.checks.CheckReport`: the lists' numbers before they went live or were held).

Table `publication_history`, append-only: every move of a prefix's live pointer (a
publication going live, a rollback, an approval of a held one) with the versions before and after, when, who and why.
"""

import json
import logging
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

log = logging.getLogger(__name__)

_LOCK_SPACE = "weekly-recs.publications"

_metadata = sa.MetaData()
publications = sa.Table(
    "publications",
    _metadata,
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("as_of", sa.Date, nullable=False),
    sa.Column("model_name", sa.Text),
    sa.Column("model_version", sa.Integer),
    sa.Column("model_kind", sa.Text),
    sa.Column("feature_as_of", sa.Date),
    sa.Column("feature_source", sa.Text),
    sa.Column("user_count", sa.BigInteger),
    sa.Column("fallback_user_count", sa.BigInteger),
    sa.Column("n", sa.Integer),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("timings", postgresql.JSONB),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("flow_run_id", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("checks", postgresql.JSONB),
)

history = sa.Table(
    "publication_history",
    _metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("from_version", sa.Text),
    sa.Column("to_version", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
)

_SCHEMA = {
    "version": pl.String,
    "as_of": pl.Date,
    "model_name": pl.String,
    "model_version": pl.Int64,
    "model_kind": pl.String,
    "feature_as_of": pl.Date,
    "feature_source": pl.String,
    "user_count": pl.Int64,
    "fallback_user_count": pl.Int64,
    "n": pl.Int64,
    "started_at": pl.Datetime("us", "UTC"),
    "finished_at": pl.Datetime("us", "UTC"),
    "timings": pl.String,
    "status": pl.String,
    "flow_run_id": pl.String,
    "error": pl.String,
    "checks": pl.String,
}


def ensure_schema(engine: sa.Engine) -> None:
    """Create the publications and publication_history tables if missing; safe when several runs start at once."""
    with engine.begin() as conn:
        conn.execute(sa.text("select pg_advisory_xact_lock(hashtext(:space), 0)"), {"space": _LOCK_SPACE})
        _metadata.create_all(conn)
        # Added after the first release: tables created before it get the column here.
        conn.execute(sa.text("alter table publications add column if not exists feature_source text"))
        conn.execute(sa.text("alter table publications add column if not exists model_kind text"))
        conn.execute(sa.text("alter table publications add column if not exists checks jsonb"))


def record_publication(engine: sa.Engine, **fields: Any) -> None:
    """Insert the row of `fields["version"]`, or update just the given columns if it exists."""
    unknown = sorted(set(fields) - set(publications.c.keys()))
    if unknown:
        raise ValueError(f"publication fields {unknown} are not columns of publications")
    if "version" not in fields:
        raise ValueError("record_publication needs the version it records")
    changes = {name: value for name, value in fields.items() if name != "version"}
    row = publications.c.version == fields["version"]
    with engine.begin() as conn:
        if conn.execute(sa.select(publications.c.version).where(row).with_for_update()).first():
            if changes:
                conn.execute(sa.update(publications).where(row).values(**changes))
        else:
            missing = [name for name in ("as_of", "status") if name not in fields]
            if missing:
                raise ValueError(f"new publication {fields['version']} needs {missing}")
            conn.execute(sa.insert(publications).values(**fields))
    log.info("recorded publication %s (%s)", fields["version"], fields.get("status", "-"))


def mark_abandoned(engine: sa.Engine, versions: list[str]) -> int:
    """Mark publications still `writing` (their run was killed) or `held` (never approved) whose keys were
    removed `abandoned`."""
    if not versions:
        return 0
    removed = publications.c.version.in_(versions) & publications.c.status.in_(("writing", "held"))
    why = sa.case(
        (publications.c.status == "held", "held, never approved; removed: " + publications.c.error),
        else_="the run stopped before finishing; a later run removed its keys",
    )
    with engine.begin() as conn:
        marked = conn.execute(sa.update(publications).where(removed).values(status="abandoned", error=why)).rowcount
    if marked:
        log.info("marked %d unfinished publications abandoned", marked)
    return marked


def record_pointer_move(
    engine: sa.Engine, *, prefix: str, action: str, from_version: str | None, to_version: str, reason: str, actor: str
) -> None:
    """Append one move of `prefix`'s live pointer (`publish`, `rollback` or `approve`) to the history."""
    if action not in ("publish", "rollback", "approve"):
        raise ValueError(f"pointer move action must be publish, rollback or approve, got {action!r}")
    values = {"prefix": prefix, "action": action, "from_version": from_version, "to_version": to_version}
    with engine.begin() as conn:
        conn.execute(sa.insert(history).values(**values, reason=reason, actor=actor))
    log.info("recorded %s of prefix %s: %s -> %s (%s)", action, prefix, from_version, to_version, actor)


def pointer_history(engine: sa.Engine, prefix: str) -> pl.DataFrame:
    """Every move of `prefix`'s live pointer, oldest first."""
    query = sa.select(history).where(history.c.prefix == prefix).order_by(history.c.id)
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(query)]
    schema = {
        "id": pl.Int64, "at": pl.Datetime("us", "UTC"), "prefix": pl.String, "action": pl.String,
        "from_version": pl.String, "to_version": pl.String, "reason": pl.String, "actor": pl.String,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def list_publications(engine: sa.Engine) -> pl.DataFrame:
    """Every publication, oldest first; `timings` as JSON text."""
    query = sa.select(publications).order_by(publications.c.as_of, publications.c.version)
    with engine.connect() as conn:
        rows = [
            {
                **row._mapping,
                "timings": None if row.timings is None else json.dumps(row.timings),
                "checks": None if row.checks is None else json.dumps(row.checks),
            }
            for row in conn.execute(query)
        ]
    return pl.DataFrame(rows, schema=_SCHEMA)
