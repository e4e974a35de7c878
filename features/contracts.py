"""The data contract of every feature table, written once.

Both the Postgres DDL (features.store) and the great-expectations suite
(features.validation) are generated from these declarations.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl


def require_columns(
    found: Sequence[str], required: Sequence[str], what: str, error: type[Exception] = ValueError
) -> None:
    """Raise `error` naming `what` and its missing columns when `found` lacks any of `required`."""
    missing = [c for c in required if c not in found]
    if missing:
        raise error(f"{what}: missing columns {missing}; found columns {list(found)}")


_SQL_TYPES: dict[type[pl.DataType], str] = {
    pl.Date: "date",
    pl.Int64: "bigint",
    pl.Int32: "integer",
    pl.Float64: "double precision",
    pl.Utf8: "text",
    pl.Boolean: "boolean",
}


@dataclass(frozen=True)
class Column:
    """One column: its polars type, nullability and allowed value range."""

    name: str
    dtype: pl.DataType
    nullable: bool = False
    min: float | None = None
    max: float | None = None

    @property
    def sql_type(self) -> str:
        return _SQL_TYPES[type(self.dtype)]


@dataclass(frozen=True)
class TableContract:
    """A feature table keyed by (as_of, entity...), with its columns and checks."""

    name: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    description: str = ""
    # Numeric columns whose distribution is compared to the recent passed snapshots.
    drift_columns: tuple[str, ...] = field(default_factory=tuple)
    # Read by inference to serve recommendations: a collapse or drift against the recent
    # snapshots fails validation; in a table that is not served it is only a warning.
    served: bool = True
    # Two columns that may never hold the same value in a row (an item is not its own transition).
    distinct_columns: tuple[str, str] | None = None
    # A snapshot may hold no rows of it (EASE's lists when the catalogue is above its bound).
    may_be_empty: bool = False

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def schema(self) -> dict[str, pl.DataType]:
        return {c.name: c.dtype for c in self.columns}

    def conform(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Select the contract's columns in order, cast to its types; name what is missing."""
        missing = [c for c in self.column_names if c not in frame.columns]
        if missing:
            raise ValueError(f"table {self.name}: frame lacks contract columns {missing}")
        return frame.select([pl.col(c.name).cast(c.dtype) for c in self.columns])


def _count(name: str) -> Column:
    return Column(name, pl.Int64(), min=0)


def _amount(name: str) -> Column:
    return Column(name, pl.Float64(), min=0)


def _share(name: str) -> Column:
    return Column(name, pl.Float64(), min=0, max=1)


AS_OF = Column("as_of", pl.Date())
USER = Column("user_id", pl.Int64())
ITEM = Column("item_id", pl.Int64())

USER_FEATURES = TableContract(
    name="user_features",
    key=("as_of", "user_id"),
    description="Activity of each user with at least one event before as_of.",
    columns=(
        AS_OF,
        USER,
        _count("events_1w"),
        _count("events_4w"),
        _count("events_12w"),
        _count("events_total"),
        _count("distinct_items_1w"),
        _count("distinct_items_4w"),
        _count("distinct_items_12w"),
        _count("distinct_items_total"),
        _amount("weight_1w"),
        _amount("weight_4w"),
        _amount("weight_12w"),
        _amount("days_since_first_event"),
        _amount("days_since_last_event"),
        _count("distinct_categories_12w"),
    ),
    drift_columns=("events_4w", "days_since_last_event"),
)

ITEM_FEATURES = TableContract(
    name="item_features",
    key=("as_of", "item_id"),
    description="Popularity and age of each item released (or first seen) before as_of.",
    columns=(
        AS_OF,
        ITEM,
        Column("category", pl.Utf8()),
        Column("creator", pl.Utf8()),
        _count("plays_1w"),
        _count("plays_4w"),
        _count("plays_12w"),
        _count("plays_total"),
        _count("users_4w"),
        _count("users_total"),
        _amount("trend_1w_vs_4w"),
        _amount("days_since_release"),
        _amount("days_since_first_event"),
        Column("popularity_rank_4w", pl.Int64(), min=1),
    ),
    drift_columns=("plays_4w", "users_total"),
)

ITEM_NEIGHBOURS = TableContract(
    name="item_neighbours",
    key=("as_of", "item_id", "neighbour_id"),
    description="Top-K co-occurrence neighbours of each item in users' recent histories.",
    columns=(
        AS_OF,
        ITEM,
        Column("neighbour_id", pl.Int64()),
        _amount("score"),
        Column("rank", pl.Int64(), min=1),
    ),
    drift_columns=("score",),
)

ITEM_TRANSITIONS = TableContract(
    name="item_transitions",
    key=("as_of", "item_id", "next_item_id"),
    description="Top-K directed transitions of each item: what users consumed right after it (time-decayed).",
    columns=(
        AS_OF,
        ITEM,
        Column("next_item_id", pl.Int64()),
        Column("transitions", pl.Int64(), min=1),
        _amount("score"),
        _share("share"),
        Column("rank", pl.Int64(), min=1),
    ),
    drift_columns=("share",),
    distinct_columns=("item_id", "next_item_id"),
)

USER_CATEGORY_AFFINITY = TableContract(
    name="user_category_affinity",
    key=("as_of", "user_id", "category"),
    description="Share of each user's last-12-week events in each category.",
    columns=(AS_OF, USER, Column("category", pl.Utf8()), _count("events_12w"), _share("share_12w")),
)

USER_CREATOR_AFFINITY = TableContract(
    name="user_creator_affinity",
    key=("as_of", "user_id", "creator"),
    description="Share of each user's last-12-week events by each creator.",
    columns=(AS_OF, USER, Column("creator", pl.Utf8()), _count("events_12w"), _share("share_12w")),
)

USER_ITEM_HISTORY = TableContract(
    name="user_item_history",
    key=("as_of", "user_id", "item_id"),
    description="Every (user, item) pair consumed before as_of: exclusion and user×item features.",
    columns=(
        AS_OF,
        USER,
        ITEM,
        _count("events"),
        _amount("weight"),
        _amount("days_since_last_event"),
    ),
)

COLLABORATIVE_SCORES = TableContract(
    name="collaborative_scores",
    key=("as_of", "user_id", "item_id"),
    description="Each user's top unconsumed items by EASE, fitted on the (user, item) pairs before as_of (none "
    "above RECSYS_EASE_MAX_ITEMS items). The ALS columns are null in the store: ALS is kept as its factors "
    "(als_user_factors, als_item_factors) and its top lists are computed from them for the users read "
    "(`features.transform.derive_collaborative_scores`), so a snapshot stores a few hundred bytes per user "
    "for ALS instead of its lists.",
    columns=(
        AS_OF,
        USER,
        ITEM,
        Column("ease_score", pl.Float64(), nullable=True),
        Column("ease_rank", pl.Int64(), nullable=True, min=1),
        Column("als_score", pl.Float64(), nullable=True),
        Column("als_rank", pl.Int64(), nullable=True, min=1),
    ),
    drift_columns=("ease_score", "als_score"),
    may_be_empty=True,
)

ALS_USER_FACTORS = TableContract(
    name="als_user_factors",
    key=("as_of", "user_id"),
    description="Each user's implicit-ALS factors fitted on the (user, item) pairs before as_of, float32 "
    "little-endian in hex: the RECSYS_ALS_SEEDS fits side by side, divided by their count (a user's and an "
    "item's dot product is their mean score).",
    columns=(AS_OF, USER, Column("factors", pl.Utf8())),
)

ALS_ITEM_FACTORS = TableContract(
    name="als_item_factors",
    key=("as_of", "item_id"),
    description="Each item's implicit-ALS factors (as als_user_factors) and the depth of the top lists computed "
    "from them (RECSYS_COLLABORATIVE_ITEMS_PER_USER when the snapshot was computed).",
    columns=(AS_OF, ITEM, Column("factors", pl.Utf8()), Column("items_per_user", pl.Int64(), min=1)),
)

LABELS = TableContract(
    name="labels",
    key=("as_of", "user_id", "item_id"),
    description="(user, item) pairs consumed in [as_of, as_of+7d); is_new when not consumed before.",
    columns=(AS_OF, USER, ITEM, _count("events"), _amount("weight"), Column("is_new", pl.Boolean())),
    served=False,  # training's ground truth only; a quiet week has few labels
)

FEATURE_TABLES: tuple[TableContract, ...] = (
    USER_FEATURES,
    ITEM_FEATURES,
    ITEM_NEIGHBOURS,
    USER_CATEGORY_AFFINITY,
    USER_CREATOR_AFFINITY,
    USER_ITEM_HISTORY,
    COLLABORATIVE_SCORES,
    ALS_USER_FACTORS,
    ALS_ITEM_FACTORS,
    ITEM_TRANSITIONS,
)
"""Tables of a feature snapshot as_of=T (events with ts < T)."""

ALL_TABLES: tuple[TableContract, ...] = (*FEATURE_TABLES, LABELS)
CONTRACTS: dict[str, TableContract] = {c.name: c for c in ALL_TABLES}

RAW_EVENTS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(),
    "item_id": pl.Int64(),
    "ts": pl.Datetime("us", "UTC"),
    "weight": pl.Float64(),
}
"""Raw interaction events, as every source delivers them."""

RAW_ITEMS_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Int64(),
    "category": pl.Utf8(),
    "creator": pl.Utf8(),
    "release_ts": pl.Datetime("us", "UTC"),
}
"""Item metadata; category/creator "unknown" and release_ts null when a source lacks them."""
