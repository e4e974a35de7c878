"""The Redis key contract of published recommendations, and looking them up as a client app does.

Key contract (prefix `P`, default `recs`, matching `^[A-Za-z0-9_.-]+$`):

- `P:{P}:live`               string: the live version id, e.g. `20261123-000007`
                             (as_of as yyyymmdd, '-', a zero-padded sequence from `P:{P}:seq`).
- `P:{P}:previous`           string: the version that was live before (kept for rollback).
- `P:{P}:meta:<version>`     hash: version, as_of (ISO date), status, model_version,
                             generated_at (ISO), user_count, fallback_user_count, n,
                             written_users (keys confirmed so far), and any extra metadata.
- `P:{P}:versions`           set: every version that has keys. A version is added before
                             any of its user keys is written, so the partial namespace of
                             a killed publisher is known and removed by the next publish.
- `P:<version>:u:<user_id>`  string: JSON array of item ids in rank order, compact: `[12,5,9]`.
- `P:<version>:fallback`     string: JSON array, the list for users without a key.

Pointer and metadata keys share the hash tag `{P}`, so the Lua scripts that swap them are
valid on Redis Cluster; user keys carry no tag and spread over the cluster's slots.

A version's status goes `writing` -> `live` -> `previous` -> `retired` (rollback swaps
`live` and `previous`); `removing` marks a version claimed for deletion, which can never
become live. How versions are written and swapped in: `inference.publish`.

Reading (any language): `GET P:{P}:live` -> v (none: nothing published yet); then in one
pipeline `GET P:v:u:<user_id>`..., `GET P:v:fallback`, `HGETALL P:{P}:meta:v` (last); a
missing user key means "use the fallback". If the metadata is gone or its status is
`removing`, v was retired between the two round trips: start again from the pointer.
On a cluster that pipeline's reads reach several nodes in no fixed order, so a reader that
got a missing user key reads the metadata once more before serving the fallback.

Clients must be created with `decode_responses=True` (as `recsys.stores.connect_redis` does).

Connection URLs (`RECSYS_REDIS_URL`) are redis-py's: `redis://[user:password@]host:port/db`,
`rediss://...` for TLS (`?ssl_ca_certs=/path/ca.pem&ssl_cert_reqs=required`, client
certificates with `ssl_certfile`/`ssl_keyfile`), `unix://[user:password@]/path.sock?db=0`;
percent-encode special characters of the password. Log them only through `recsys.stores.redact_url`.
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from numbers import Integral

import polars as pl
import redis

from recsys.errors import ExpectedError

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
VERSION_PATTERN = re.compile(r"^\d{8}-\d{6,}$")
_READ_ATTEMPTS = 5


class NoPublicationError(ExpectedError, LookupError):
    """Nothing is published (or nothing to roll back to) under a prefix."""


@dataclass(frozen=True)
class KeySpace:
    """The Redis key names of one prefix."""

    prefix: str

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.match(self.prefix):
            raise ValueError(f"Redis prefix {self.prefix!r} is invalid: use letters, digits, '_', '.' or '-'")

    @property
    def live(self) -> str:
        return f"{self.prefix}:{{{self.prefix}}}:live"

    @property
    def previous(self) -> str:
        return f"{self.prefix}:{{{self.prefix}}}:previous"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:{{{self.prefix}}}:seq"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:{{{self.prefix}}}:versions"

    def meta(self, version: str) -> str:
        return f"{self.prefix}:{{{self.prefix}}}:meta:{version}"

    def user(self, version: str, user_id: int | str) -> str:
        return f"{self.prefix}:{version}:u:{user_id}"

    def fallback(self, version: str) -> str:
        return f"{self.prefix}:{version}:fallback"

    def namespace_pattern(self, version: str) -> str:
        """SCAN MATCH pattern of every key of one version (user keys and fallback)."""
        return f"{self.prefix}:{check_version(version)}:*"


@dataclass(frozen=True)
class Recommendation:
    """What a client app gets for one user."""

    user_id: int
    items: list[int]
    model_version: str
    as_of: date
    version: str
    is_fallback: bool


def client_keys(r: redis.Redis, prefix: str) -> KeySpace:
    """The key space of `prefix`, once the client is known to decode replies to str."""
    if not r.get_encoder().decode_responses:
        raise ValueError("the Redis client must be created with decode_responses=True")
    return KeySpace(prefix)


def format_version(as_of: date, seq: int) -> str:
    """The version id for a publication: `yyyymmdd-000007`."""
    return f"{as_of:%Y%m%d}-{seq:06d}"


def check_version(version: str) -> str:
    """Return the version id unchanged, or raise if it is not one (it ends up in SCAN patterns)."""
    if not VERSION_PATTERN.match(version):
        raise ValueError(f"version {version!r} is not a publication version like '20261123-000007'")
    return version


def encode_items(items: Sequence[int]) -> str:
    """One item list as the compact JSON array stored in Redis: `[12,5,9]`."""
    if len(items) == 0:
        raise ValueError("an item list to publish is empty")
    bad = [i for i in items if not isinstance(i, Integral) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"item ids must be integers, got {bad[:5]!r}")
    return json.dumps([int(i) for i in items], separators=(",", ":"))


def encode_recommendations(prefix: str, version: str, recs: pl.DataFrame) -> pl.DataFrame:
    """The Redis keys and values of a recommendations frame, as columns `key`, `value`."""
    keys = KeySpace(prefix)
    check_version(version)
    check_recommendations(recs)
    return recs.select(
        key=pl.format(keys.user(version, "{}"), "user_id"),
        value=pl.concat_str(pl.lit("["), pl.col("items").cast(pl.List(pl.String)).list.join(","), pl.lit("]")),
    )


def check_recommendations(recs: pl.DataFrame) -> None:
    """Raise ValueError naming the problem unless `recs` has one non-empty integer list per user."""
    missing = {"user_id", "items"} - set(recs.columns)
    if missing:
        raise ValueError(f"recommendations frame lacks columns {sorted(missing)}")
    items_type = recs.schema["items"]
    if not recs.schema["user_id"].is_integer():
        raise ValueError(f"recommendations user_id must be integers, got {recs.schema['user_id']}")
    if not (isinstance(items_type, pl.List) and items_type.inner.is_integer()):
        raise ValueError(f"recommendations items must be a list of integers, got {items_type}")
    if recs["user_id"].null_count():
        raise ValueError("recommendations have null user_id values")
    duplicated = recs.filter(pl.col("user_id").is_duplicated())["user_id"].unique().sort()
    if len(duplicated):
        raise ValueError(f"recommendations repeat users {duplicated.head(5).to_list()}")
    empty = recs.filter(pl.col("items").list.len().fill_null(0) == 0)["user_id"]
    if len(empty):
        raise ValueError(f"recommendations have empty item lists for users {empty.head(5).to_list()}")
    if recs["items"].explode().null_count():
        raise ValueError("recommendations have null item ids")


def get_recommendations(r: redis.Redis, prefix: str, user_ids: Sequence[int]) -> list[Recommendation]:
    """The live recommendations of `user_ids`, in order; users without a key get the fallback.

    Two round trips for the whole batch: the pointer, then one pipeline of reads.
    """
    keys = client_keys(r, prefix)
    bad = [u for u in user_ids if not isinstance(u, Integral) or isinstance(u, bool)]
    if bad:
        raise ValueError(f"user ids must be integers, got {bad[:5]!r}")
    for _ in range(_READ_ATTEMPTS):
        version = r.get(keys.live)
        if version is None:
            raise NoPublicationError(f"no recommendations published yet under prefix {prefix!r}")
        pipe = r.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.get(keys.user(version, int(user_id)))
        pipe.get(keys.fallback(version))
        # Metadata is read last: if it is not yet marked for removal, nothing before it was removed.
        pipe.hgetall(keys.meta(version))
        *values, fallback, meta = pipe.execute()
        if None in values and isinstance(r, redis.RedisCluster):
            # The pipeline reached the nodes in no fixed order: the metadata may have been read
            # before a missing key. Read it again, so a removal that caused the miss is seen.
            meta = r.hgetall(keys.meta(version))
        if fallback is not None and meta.get("status") not in (None, "removing"):
            return [
                Recommendation(
                    user_id=int(user_id),
                    items=json.loads(value if value is not None else fallback),
                    model_version=meta.get("model_version", ""),
                    as_of=date.fromisoformat(meta["as_of"]),
                    version=version,
                    is_fallback=value is None,
                )
                for user_id, value in zip(user_ids, values, strict=True)
            ]
        # The version was retired and removed between the two round trips: resolve again.
    raise NoPublicationError(f"the live version under prefix {prefix!r} kept disappearing while reading")
