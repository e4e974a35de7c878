"""The publish protocol: write a new version of the recommendations to Redis, then swap it in atomically.

Keys, statuses and the reading side: `inference.serving`. Publishing writes a new
namespace, verifies it is complete (every user key confirmed and the fallback present)
and only then compare-and-sets the pointer in one Lua script, so a reader sees the
complete old set or the complete new set, even if the publisher is killed. A publication
whose as_of is older than the live one's loses (`StalePublication`); for equal as_of the
later publish wins. Publishes of one prefix are meant to run one at a time (the flow
serialises them); if two overlap, the one that starts or finishes later removes the
other's unfinished namespace and the other fails with `StalePublication`.

On a cluster (`recsys.stores.connect_redis(url, cluster=True)`, setting `RECSYS_REDIS_CLUSTER`)
every step that touches keys of several slots sends one command per slot (redis-py's
cluster pipeline), and transactions only ever span `{P}` keys.

`start_publication` and `abandon_publication` keep each version's lineage row in Postgres
(`inference.publications`) in step with its keys.

Given bounds, `finish_publication` first checks the new lists against the live ones
(`inference.checks`): out of bounds, the version is kept but not made live (status `held`)
until `approve_publication` makes it live or a newer publication goes live; then the
cleanup removes it.
"""

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
import redis
import sqlalchemy as sa

from features import contracts, store
from inference import publications
from inference.archive import read_published_lists
from inference.checks import CheckBounds, CheckReport, check_publication
from inference.serving import (
    VERSION_PATTERN,
    KeySpace,
    NoPublicationError,
    check_version,
    client_keys,
    encode_items,
    encode_recommendations,
    format_version,
)
from ranking.registry import ModelRecord
from recsys.errors import ExpectedError
from recsys.stores import advisory_lock

log = logging.getLogger(__name__)

REQUIRED_METADATA = ("model_version", "generated_at", "n", "fallback_user_count")
_RESERVED_METADATA = ("version", "as_of", "status", "user_count", "written_users")
_SCAN_BATCH = 1_000
_CAS_ATTEMPTS = 5

# KEYS: live, previous, new meta, live meta, previous meta.
# ARGV: new version, live and previous as read by the caller ('' when unset), the new one's status now.
_SWAP_POINTER = """
local live = redis.call('GET', KEYS[1]) or ''
local previous = redis.call('GET', KEYS[2]) or ''
if live ~= ARGV[2] or previous ~= ARGV[3] then return 'changed' end
if redis.call('HGET', KEYS[3], 'status') ~= ARGV[4] then return 'gone' end
if live ~= '' then
  local live_as_of = redis.call('HGET', KEYS[4], 'as_of')
  if live_as_of and live_as_of > redis.call('HGET', KEYS[3], 'as_of') then return 'stale' end
  redis.call('SET', KEYS[2], live)
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('HSET', KEYS[4], 'status', 'previous') end
end
if previous ~= '' and previous ~= live and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HSET', KEYS[5], 'status', 'retired')
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], 'status', 'live')
return 'live'
"""

# KEYS: meta of the version. 1 = held (it was being written and nothing claimed it).
_HOLD = """
if redis.call('HGET', KEYS[1], 'status') ~= 'writing' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'held')
return 1
"""

# KEYS: live, previous, live meta, previous meta. ARGV: live and previous as read.
_ROLLBACK = """
local live = redis.call('GET', KEYS[1]) or ''
local previous = redis.call('GET', KEYS[2]) or ''
if live ~= ARGV[1] or previous ~= ARGV[2] then return 'changed' end
if redis.call('HGET', KEYS[4], 'status') ~= 'previous' then return 'gone' end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'status', 'previous')
redis.call('HSET', KEYS[4], 'status', 'live')
return 'ok'
"""

# KEYS: meta of the version. ARGV: keys confirmed new. Counts only while the version is written.
_COUNT_WRITTEN = """
if redis.call('HGET', KEYS[1], 'status') ~= 'writing' then return false end
return redis.call('HINCRBY', KEYS[1], 'written_users', ARGV[1])
"""

# KEYS: meta of the version, then the user keys of one chunk. ARGV: their values.
# Writes the chunk and counts its new keys in one atomic step, so no crash can leave keys
# written but uncounted; false (nothing written) unless the version is being written.
_WRITE_CHUNK = """
if redis.call('HGET', KEYS[1], 'status') ~= 'writing' then return false end
local new = 0
for i = 2, #KEYS do
  new = new + 1 - redis.call('EXISTS', KEYS[i])
  redis.call('SET', KEYS[i], ARGV[i - 1])
end
redis.call('HINCRBY', KEYS[1], 'written_users', new)
return new
"""

# KEYS: live, previous, meta of the version. ARGV: the version. 1 = claimed for removal.
_CLAIM_FOR_REMOVAL = """
if ARGV[1] == redis.call('GET', KEYS[1]) or ARGV[1] == redis.call('GET', KEYS[2]) then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[3], 'status', 'removing') end
return 1
"""


class PublishError(RuntimeError):
    """A publication failed; the live and previous pointers are as they were."""


class StalePublication(ExpectedError, PublishError):
    """A newer publication won: this one's as_of is older, or its namespace was removed."""


class PublicationHeld(ExpectedError, PublishError):
    """The new lists are out of bounds: the version is kept, not live, until approved."""

    def __init__(self, version: str, report: CheckReport) -> None:
        super().__init__(
            f"publication {version} held, not made live: {'; '.join(report.reasons)}. Bounds are the "
            f"RECSYS_PUBLISH_* settings; to serve it anyway: recsys publish approve {version} --reason '...'"
        )
        self.version, self.report = version, report


class ApprovalRefused(ExpectedError, ValueError):
    """`approve_publication` was asked for something it cannot do; nothing changed."""


@dataclass(frozen=True)
class PublishResult:
    """The outcome of a publication that went live."""

    version: str
    as_of: date
    previous: str | None
    user_count: int
    removed: tuple[str, ...]
    checks: CheckReport | None = None


@contextmanager
def _failing_as_publish_error(what: str, step: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise PublishError(f"publishing {what}: {step} failed: {exc}") from exc


def refuse_stale(r: redis.Redis, prefix: str, as_of: date) -> None:
    """Raise StalePublication if the live version is for a newer as_of than `as_of`.

    A cheap early check, so a stale run fails before scoring; the pointer swap checks again.
    """
    keys = client_keys(r, prefix)
    live = r.get(keys.live)
    live_as_of = r.hget(keys.meta(live), "as_of") if live else None
    if live_as_of and date.fromisoformat(live_as_of) > as_of:
        raise StalePublication(
            f"as_of {as_of} is older than the live version {live} (as_of {live_as_of}) under prefix "
            f"{prefix!r}: refusing to publish older recommendations; nothing was written"
        )


def start_publication(engine: sa.Engine, r: redis.Redis, prefix: str, as_of: date, *, keep: int = 2) -> str:
    """Refuse an as_of older than the live one, remove what killed runs left, and allocate a version.

    The versions removed were never finished: their lineage rows are marked `abandoned`.
    """
    refuse_stale(r, prefix, as_of)
    publications.mark_abandoned(engine, cleanup_stale_versions(r, prefix, keep=keep))
    return begin_publication(r, prefix, as_of)


def begin_publication(r: redis.Redis, prefix: str, as_of: date) -> str:
    """Allocate a new version for `as_of` and register it (status `writing`)."""
    keys = client_keys(r, prefix)
    if isinstance(as_of, datetime) or not isinstance(as_of, date):
        raise ValueError(f"as_of must be a date, got {as_of!r}")
    with _failing_as_publish_error(f"as_of {as_of}", "allocating a version"):
        version = format_version(as_of, r.incr(keys.seq))
        # Both keys carry the tag {P}: one slot, so a transaction on a cluster too.
        pipe = r.pipeline(transaction=True)
        pipe.sadd(keys.versions, version)
        pipe.hset(
            keys.meta(version),
            mapping={
                "version": version,
                "as_of": as_of.isoformat(),
                "status": "writing",
                "written_users": 0,
            },
        )
        pipe.execute()
    log.info("began publication %s for %s under prefix %s", version, as_of, prefix)
    return version


def write_recommendations(r: redis.Redis, prefix: str, version: str, recs: pl.DataFrame, *, chunk: int = 2_000) -> int:
    """Write one user key per row of `recs` (user_id, items); return how many rows were written.

    May be called many times per version (one per partition), also from several threads.
    Each chunk is one script call that writes its keys and adds the new ones to the
    `written_users` count in one atomic step, so the count `finish_publication` checks
    stays exact when a partition is written twice, even after a crash mid-write.
    """
    keys = client_keys(r, prefix)
    encoded = encode_recommendations(prefix, version, recs)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    started = time.perf_counter()
    names, values = encoded["key"].to_list(), encoded["value"].to_list()
    write = _chunk_writer(r, keys.meta(version))
    written = 0
    try:
        for start in range(0, len(names), chunk):
            if write(names[start : start + chunk], values[start : start + chunk]) is None:
                _remove_namespace(r, keys, version)
                raise StalePublication(
                    f"version {version} under prefix {prefix!r} is not being written: a "
                    "concurrent publish removed it, or it was never begun"
                )
            written += len(names[start : start + chunk])
    except redis.RedisError as exc:
        raise PublishError(
            f"publishing version {version}: writing user keys failed after {written} of {len(names)}: {exc}"
        ) from exc
    log.info("wrote %d user keys of version %s in %.2fs", written, version, time.perf_counter() - started)
    return written


def _chunk_writer(r: redis.Redis, meta: str) -> Callable[[list[str], list[str]], int | None]:
    """A function writing one chunk of user keys; returns how many were new, None if not writing.

    On one server a Lua script writes and counts the chunk atomically. A cluster refuses
    scripts across slots: there the keys are written per slot, then counted, so a crash
    between the two, or two writers of one chunk, leave the count wrong; `finish_publication`
    then counts the keys themselves.
    """
    if not isinstance(r, redis.RedisCluster):
        script = r.register_script(_WRITE_CHUNK)

        def write(names: list[str], values: list[str]) -> int | None:
            return script(keys=[meta, *names], args=values)

        return write
    count = r.register_script(_COUNT_WRITTEN)

    def write_on_cluster(names: list[str], values: list[str]) -> int | None:
        existing = r.exists(*names)
        replies = r.mset_nonatomic(dict(zip(names, values, strict=True)))
        if not all(reply is True for reply in replies):
            raise redis.ResponseError(f"MSET of {len(names)} keys from {names[0]!r} replied {replies!r}")
        return count(keys=[meta], args=[len(names) - existing])

    return write_on_cluster


def write_fallback(r: redis.Redis, prefix: str, version: str, items: Sequence[int]) -> None:
    """Write the fallback list that users without a key get."""
    keys = client_keys(r, prefix)
    value = encode_items(items)
    with _failing_as_publish_error(f"version {check_version(version)}", "writing the fallback list"):
        r.set(keys.fallback(version), value)
    log.info("wrote fallback of %d items for version %s", len(items), version)


def finish_publication(
    r: redis.Redis,
    prefix: str,
    version: str,
    *,
    expected_users: int,
    metadata: dict[str, Any],
    keep: int = 2,
    bounds: CheckBounds | None = None,
    catalogue: pl.Series | None = None,
) -> PublishResult:
    """Verify the version is complete, check it against `bounds`, make it live, and remove versions beyond `keep`.

    `metadata` must hold model_version, generated_at, n and fallback_user_count (and feature_as_of
    for the checks). With `bounds`, `catalogue` (the snapshot's item ids, `read_catalogue`) is
    required; lists out of bounds raise `PublicationHeld` and the pointer is not moved.
    """
    keys = client_keys(r, prefix)
    fields = _metadata_fields(metadata, expected_users)
    with _failing_as_publish_error(f"version {check_version(version)}", "verifying the namespace"):
        pipe = r.pipeline(transaction=False)
        pipe.hgetall(keys.meta(version))
        pipe.exists(keys.fallback(version))
        meta, has_fallback = pipe.execute()
    status = meta.get("status")
    if status in (None, "removing"):
        with _failing_as_publish_error(f"version {version}", "removing its namespace"):
            _remove_namespace(r, keys, version)
        raise StalePublication(f"version {version} under prefix {prefix!r} was removed by a concurrent publish")
    if status != "writing":
        raise PublishError(f"version {version} under prefix {prefix!r} is already {status}")
    written = int(meta.get("written_users", 0))
    if written != expected_users and isinstance(r, redis.RedisCluster):
        with _failing_as_publish_error(f"version {version}", "counting its user keys"):
            written = _count_user_keys(r, keys, version)
    if written != expected_users:
        raise PublishError(
            f"version {version} is incomplete: {written} of {expected_users} user keys "
            "confirmed written; the pointer was not moved"
        )
    if not has_fallback:
        raise PublishError(f"version {version} has no fallback list: call write_fallback first")
    with _failing_as_publish_error(f"version {version}", "switching the live pointer"):
        r.hset(keys.meta(version), mapping=fields)
        report = None if bounds is None else _check_lists(r, keys, version, fields, bounds, catalogue)
        outcome, previous = _swap_pointer(r, keys, version, "writing")
        if outcome != "live":
            _remove_namespace(r, keys, version)
            live_as_of = r.hget(keys.meta(previous), "as_of") if previous else None
    if outcome == "stale":
        raise StalePublication(
            f"version {version} (as_of {meta['as_of']}) lost: the live version {previous} is "
            f"for a newer as_of {live_as_of}; the keys of {version} were removed"
        )
    if outcome != "live":
        raise StalePublication(f"version {version} was removed by a concurrent publish")
    log.info("version %s is live under prefix %s (previous %s)", version, prefix, previous)
    with _failing_as_publish_error(f"version {version}", "removing old versions"):
        removed = cleanup_stale_versions(r, prefix, keep=keep)
    return PublishResult(
        version=version,
        as_of=date.fromisoformat(meta["as_of"]),
        previous=previous,
        user_count=expected_users,
        removed=tuple(removed),
        checks=report,
    )


def read_catalogue(engine: sa.Engine, snapshot: date) -> pl.Series:
    """The item ids of the snapshot's item table: what `finish_publication` checks the lists against."""
    return store.read_table(engine, contracts.ITEM_FEATURES.name, snapshot, columns=["item_id"])["item_id"]


def _check_lists(
    r: redis.Redis,
    keys: KeySpace,
    version: str,
    fields: dict[str, str],
    bounds: CheckBounds,
    catalogue: pl.Series | None,
) -> CheckReport:
    """Check the version's lists against the live version's and `bounds`; hold it (and raise) if out of bounds.

    Reads both versions' lists in bulk: about 0.8 s per 100k users each.
    """
    if catalogue is None:
        raise ValueError("finish_publication: checking the lists against bounds needs the catalogue")
    started = time.perf_counter()
    live = r.get(keys.live)
    live_snapshot = r.hget(keys.meta(live), "feature_as_of") if live else None
    report = check_publication(
        read_published_lists(r, keys.prefix, version),
        read_published_lists(r, keys.prefix, live) if live else None,
        catalogue,
        fallback_users=int(fields["fallback_user_count"]),
        snapshot_changed=live_snapshot != fields.get("feature_as_of"),
        bounds=bounds,
    )
    log.info("checked version %s against %s in %.2fs: %s", version, live, time.perf_counter() - started, report)
    if not report.reasons:
        return report
    if not r.register_script(_HOLD)(keys=[keys.meta(version)]):
        raise StalePublication(f"version {version} was removed by a concurrent publish")
    raise PublicationHeld(version, report)


def approve_publication(
    engine: sa.Engine, r: redis.Redis, prefix: str, version: str, *, reason: str, actor: str, keep: int = 2
) -> PublishResult:
    """Make a held version live with the lock and compare-and-set of a publish; record the move as `approve`.

    Refuses (`ApprovalRefused`, nothing changed) a missing reason, an unknown version, one that
    is not held, and one older than the live version.
    """
    if not reason or not reason.strip():
        raise ApprovalRefused(f"approving {version}: a reason is required (--reason)")
    if not VERSION_PATTERN.match(version):
        raise ApprovalRefused(f"{version!r} is not a publication version like '20261123-000007'")
    keys = client_keys(r, prefix)
    with advisory_lock(engine, f"publish:{prefix}"):
        meta = r.hgetall(keys.meta(version))
        status, live = meta.get("status"), r.get(keys.live)
        if not meta:
            raise ApprovalRefused(
                f"no publication {version} under prefix {prefix!r} (unknown, or removed once a newer one went "
                "live): `recsys publish list` shows the held ones"
            )
        if status != "held":
            raise ApprovalRefused(f"publication {version} is {status}, not held: only a held publication is approved")
        if live and _version_order(live) > _version_order(version):
            raise ApprovalRefused(
                f"held publication {version} is older than the live {live}: approving it would replace newer "
                "lists; nothing changed"
            )
        outcome, previous = _swap_pointer(r, keys, version, "held")
        if outcome != "live":
            raise StalePublication(f"version {version} could not be made live ({outcome}); nothing changed")
        removed = cleanup_stale_versions(r, prefix, keep=keep)
        publications.mark_abandoned(engine, removed)
        publications.record_publication(engine, version=version, status="live", finished_at=datetime.now(UTC))
        publications.record_pointer_move(
            engine, prefix=prefix, action="approve", from_version=previous, to_version=version, reason=reason,
            actor=actor,
        )  # fmt: skip
    log.info("approved held version %s under prefix %s (previous %s)", version, prefix, previous)
    return PublishResult(
        version=version,
        as_of=date.fromisoformat(meta["as_of"]),
        previous=previous,
        user_count=int(meta.get("user_count", 0)),
        removed=tuple(removed),
    )


def _version_order(version: str) -> tuple[str, int]:
    """Versions in publication order: by as_of, then by sequence number."""
    as_of, seq = version.split("-")
    return as_of, int(seq)


def _count_user_keys(r: redis.RedisCluster, keys: KeySpace, version: str) -> int:
    """How many user keys a version has, by SCAN of every primary: exact, but reads the whole keyspace."""
    started = time.perf_counter()
    found = sum(1 for _ in r.scan_iter(match=keys.user(version, "*"), count=_SCAN_BATCH))
    log.info("counted %d user keys of version %s in %.2fs", found, version, time.perf_counter() - started)
    return found


def _metadata_fields(metadata: dict[str, Any], expected_users: int) -> dict[str, str]:
    missing = [name for name in REQUIRED_METADATA if name not in metadata]
    if missing:
        raise ValueError(f"publication metadata lacks {missing}")
    reserved = [name for name in _RESERVED_METADATA if name in metadata]
    if reserved:
        raise ValueError(f"publication metadata may not set {reserved}: they are managed here")
    if expected_users < 0:
        raise ValueError(f"expected_users must be >= 0, got {expected_users}")
    fields = {name: value.isoformat() if isinstance(value, date) else str(value) for name, value in metadata.items()}
    return {**fields, "user_count": str(expected_users)}


def _swap_pointer(r: redis.Redis, keys: KeySpace, version: str, status: str) -> tuple[str, str | None]:
    """Compare-and-set live := version if it is in `status`; the script's outcome and the old live version."""
    swap = r.register_script(_SWAP_POINTER)
    for _ in range(_CAS_ATTEMPTS):
        live, previous = _read_pointers(r, keys)
        outcome = swap(
            keys=[
                keys.live,
                keys.previous,
                keys.meta(version),
                keys.meta(live or version),
                keys.meta(previous or version),
            ],
            args=[version, live or "", previous or "", status],
        )
        if outcome != "changed":
            return outcome, live
    raise PublishError(f"version {version}: the live pointer kept changing; gave up after {_CAS_ATTEMPTS} tries")


def _read_pointers(r: redis.Redis, keys: KeySpace) -> tuple[str | None, str | None]:
    pipe = r.pipeline(transaction=False)
    pipe.get(keys.live)
    pipe.get(keys.previous)
    live, previous = pipe.execute()
    return live, previous


def cleanup_stale_versions(r: redis.Redis, prefix: str, *, keep: int = 2) -> list[str]:
    """Remove every version but live, previous, the newest `keep - 2` retired ones and the newest held one
    while it is newer than live.

    This includes the partial namespaces of killed or failed publishers. Returns the
    versions removed.
    """
    keys = client_keys(r, prefix)
    if keep < 2:
        raise ValueError(f"keep must be at least 2 (live and previous), got {keep}")
    versions = sorted(r.smembers(keys.versions))
    live, previous = _read_pointers(r, keys)
    pipe = r.pipeline(transaction=False)
    for version in versions:
        pipe.hget(keys.meta(version), "status")
    statuses = dict(zip(versions, pipe.execute(), strict=True))
    retired = [v for v in versions if statuses[v] == "retired" and v not in (live, previous)]
    held = [v for v in versions if statuses[v] == "held" and (live is None or _version_order(v) > _version_order(live))]
    kept = {live, previous, *retired[max(0, len(retired) - (keep - 2)) :], *held[-1:]}
    claim = r.register_script(_CLAIM_FOR_REMOVAL)
    removed = []
    for version in versions:
        if version in kept:
            continue
        if not VERSION_PATTERN.match(version):
            log.warning("ignoring %r in %s: not a version id", version, keys.versions)
            continue
        if claim(keys=[keys.live, keys.previous, keys.meta(version)], args=[version]):
            _remove_namespace(r, keys, version)
            removed.append(version)
    if removed:
        log.info("removed versions %s under prefix %s", removed, prefix)
    return removed


def _remove_namespace(r: redis.Redis, keys: KeySpace, version: str) -> None:
    """UNLINK a version's keys in SCAN batches, then its metadata and set membership.

    On a cluster, SCAN visits every primary and redis-py splits each UNLINK into one
    command per slot, sent as one pipeline.
    """
    started = time.perf_counter()
    unlinked = 0
    batch: list[str] = []
    for name in r.scan_iter(match=keys.namespace_pattern(version), count=_SCAN_BATCH):
        batch.append(name)
        if len(batch) == _SCAN_BATCH:
            unlinked += r.unlink(*batch)
            batch = []
    if batch:
        unlinked += r.unlink(*batch)
    # Metadata and set membership go last, so an interrupted removal is found again.
    # Both carry the tag {P}: one slot, so a transaction on a cluster too.
    pipe = r.pipeline(transaction=True)
    pipe.unlink(keys.meta(version))
    pipe.srem(keys.versions, version)
    pipe.execute()
    log.info("unlinked %d keys of version %s in %.2fs", unlinked, version, time.perf_counter() - started)


def rollback_publication(engine: sa.Engine, r: redis.Redis, prefix: str, *, reason: str, actor: str) -> str:
    """`rollback` under the publish lock, recorded in the pointer history; the version live now."""
    if not reason or not reason.strip():
        raise ApprovalRefused(f"rolling back prefix {prefix!r}: a reason is required (--reason)")
    with advisory_lock(engine, f"publish:{prefix}"):
        version = rollback(r, prefix)
        before = client_keys(r, prefix).previous  # the swap made the old live version previous
        publications.record_pointer_move(
            engine, prefix=prefix, action="rollback", from_version=r.get(before), to_version=version,
            reason=reason, actor=actor,
        )  # fmt: skip
    return version


def rollback(r: redis.Redis, prefix: str) -> str:
    """Swap live and previous atomically; return the version that is live now."""
    keys = client_keys(r, prefix)
    swap = r.register_script(_ROLLBACK)
    for _ in range(_CAS_ATTEMPTS):
        live, previous = _read_pointers(r, keys)
        if live is None or previous is None:
            raise NoPublicationError(f"no previous version to roll back to under prefix {prefix!r}")
        outcome = swap(
            keys=[keys.live, keys.previous, keys.meta(live), keys.meta(previous)],
            args=[live, previous],
        )
        if outcome == "ok":
            log.info("rolled back prefix %s from %s to %s", prefix, live, previous)
            return previous
        if outcome == "gone":
            raise NoPublicationError(
                f"cannot roll back prefix {prefix!r}: previous version {previous} is being removed"
            )
    raise PublishError(f"the pointers under prefix {prefix!r} kept changing; rollback gave up")


def abandon_publication(
    engine: sa.Engine, r: redis.Redis, prefix: str, version: str, error: Exception, *, keep: int = 2
) -> None:
    """Record why `version` failed (`stale`, `failed`, or `held` with its checks) and remove its keys (a held
    version's stay, see `cleanup_stale_versions`).

    Called while `error` propagates: if a store fails here too, it is only logged, so the
    caller still raises the original error.
    """
    held = isinstance(error, PublicationHeld)
    status = "held" if held else "stale" if isinstance(error, StalePublication) else "failed"
    report = {"checks": error.report.as_dict()} if held else {}
    try:
        publications.record_publication(
            engine, version=version, status=status, finished_at=datetime.now(UTC), error=str(error)[:2000], **report
        )
        cleanup_stale_versions(r, prefix, keep=keep)
    except (redis.RedisError, sa.exc.SQLAlchemyError) as cleanup_error:
        log.warning("could not record or clean up failed publication %s: %s", version, cleanup_error)


def publication_metadata(
    record: ModelRecord, snapshot: date, *, n: int, fallback_users: int, generated_at: datetime
) -> dict[str, Any]:
    """The metadata hash clients read next to the lists (see `inference.serving`)."""
    return {
        "model_version": record.label,
        "generated_at": generated_at.isoformat(),
        "n": n,
        "fallback_user_count": fallback_users,
        "feature_as_of": snapshot.isoformat(),
    }
