"""Checks before a publication goes live, approval of a held one, and the resolve flows, on real stores.

Seeded like tests/integration/test_inference_flow.py: two snapshots (EARLIER, AS_OF) and a champion.
"""

import json

import polars as pl
import pytest

from cli import main as cli
from flows.inference_flow import inference_flow
from flows.resolve import model_promote_flow, model_rollback_flow, publication_approve_flow, publication_rollback_flow
from inference import archive, publications, publish, scoring, serving
from inference.checks import CheckBounds
from ranking import registry
from recsys.settings import Settings
from recsys.stores import open_stores
from tests.integration.test_inference_flow import AS_OF, EARLIER, Seed, live_lists, pointers, seed, seeded

pytestmark = pytest.mark.integration
__all__ = ["seed", "seeded"]  # fixtures


def rows(settings: Settings) -> dict[str, dict]:
    with open_stores(settings) as stores:
        return {row["version"]: row for row in publications.list_publications(stores.engine).iter_rows(named=True)}


def moves(settings: Settings) -> list[tuple]:
    with open_stores(settings) as stores:
        history = publications.pointer_history(stores.engine, settings.redis_prefix)
    return history.select("action", "from_version", "to_version", "reason", "actor").rows()


def status_in_redis(settings: Settings, version: str) -> str | None:
    with open_stores(settings) as stores:
        return stores.redis.hget(serving.KeySpace(settings.redis_prefix).meta(version), "status")


def serve_the_same_list(monkeypatch) -> None:
    """A broken model: every user gets items 1..n, in order."""

    def same_list(booster, feature_names, categories, tables, users, config, n, steps=None):
        return pl.DataFrame({"user_id": users, "items": [list(range(1, n + 1))] * len(users)})

    monkeypatch.setattr(scoring, "recommend_users", same_list)


def hold_a_publication(settings: Settings, monkeypatch) -> str:
    """A live publication, then a held one (everyone gets the same list); the held version."""
    inference_flow(as_of=AS_OF)
    model = scoring.recommend_users
    serve_the_same_list(monkeypatch)
    with pytest.raises(publish.PublicationHeld) as held:
        inference_flow(as_of=AS_OF)
    monkeypatch.setattr(scoring, "recommend_users", model)
    return held.value.version


def test_a_normal_publication_passes_the_checks_and_records_its_numbers(seeded: Settings):
    first = inference_flow(as_of=EARLIER)
    second = inference_flow(as_of=AS_OF)

    found = rows(seeded)
    no_live = json.loads(found[first["version"]]["checks"])
    assert no_live["changed_share"] is None and no_live["reasons"] == []
    checks = json.loads(found[second["version"]]["checks"])
    assert checks["reasons"] == [] and 0 < checks["changed_share"] <= 1 and 0 <= checks["median_overlap"] < 1
    assert checks["unknown_items"] == 0 and checks["min_length"] == seeded.top_n and checks["coverage"] > 0.1
    assert checks["top_item_share"] < 0.98 and checks["fallback_share"] < 0.01
    assert pointers(seeded)[:2] == (second["version"], first["version"])


def test_a_model_giving_everyone_the_same_list_is_held_and_approve_makes_it_live(seeded: Settings, monkeypatch, capsys):
    live = inference_flow(as_of=AS_OF)
    before = live_lists(seeded)
    serve_the_same_list(monkeypatch)

    with pytest.raises(publish.PublicationHeld) as held:
        inference_flow(as_of=AS_OF)

    message = str(held.value)
    assert "\n" not in message and "100.0% of lists start with the same item" in message
    assert f"recsys publish approve {held.value.version} --reason" in message
    version = held.value.version
    assert pointers(seeded) == (live["version"], None, {live["version"], version})
    assert live_lists(seeded) == before
    row = rows(seeded)[version]
    assert row["status"] == "held" and "max_top_item_share" in row["error"]
    assert json.loads(row["checks"])["top_item_share"] == 1.0
    assert status_in_redis(seeded, version) == "held"

    assert cli.main(["publish", "approve", version, "--reason", "new catalogue: one list is right"]) == 0

    assert f"readers now see version {version}" in capsys.readouterr().out
    assert pointers(seeded)[:2] == (version, live["version"])
    assert {tuple(rec.items) for rec in live_lists(seeded).values() if not rec.is_fallback} == {
        tuple(range(1, seeded.top_n + 1))
    }
    assert rows(seeded)[version]["status"] == "live"
    action, from_version, to_version, reason, actor = moves(seeded)[-1]
    assert (action, from_version, to_version) == ("approve", live["version"], version)
    assert reason == "new catalogue: one list is right" and actor.startswith("cli:")


def test_lists_identical_to_last_weeks_are_held_when_the_snapshot_changed(seeded: Settings, monkeypatch):
    earlier = inference_flow(as_of=EARLIER)
    with open_stores(seeded) as stores:
        last_week = archive.read_published_lists(stores.redis, seeded.redis_prefix, earlier["version"])

    def last_weeks_lists(booster, feature_names, categories, tables, users, config, n, steps=None):
        return last_week.filter(pl.col("user_id").is_in(users.implode()))

    monkeypatch.setattr(scoring, "recommend_users", last_weeks_lists)

    with pytest.raises(publish.PublicationHeld, match="no user's list changed although the feature snapshot did"):
        inference_flow(as_of=AS_OF)

    assert pointers(seeded)[0] == earlier["version"]
    (held,) = [row for row in rows(seeded).values() if row["status"] == "held"]
    assert held["as_of"] == AS_OF and json.loads(held["checks"])["changed_share"] == 0


def test_a_held_version_is_removed_once_a_newer_publication_goes_live(seeded: Settings, monkeypatch):
    held = hold_a_publication(seeded, monkeypatch)

    newer = inference_flow(as_of=AS_OF)

    assert held not in pointers(seeded)[2] and newer["version"] in pointers(seeded)[2]
    row = rows(seeded)[held]
    assert row["status"] == "abandoned" and row["error"].startswith("held, never approved; removed: ")
    with open_stores(seeded) as stores, pytest.raises(publish.ApprovalRefused, match=f"no publication {held} under"):
        publish.approve_publication(stores.engine, stores.redis, seeded.redis_prefix, held, reason="r", actor="t")


def test_bad_approvals_each_say_why_in_one_line_and_change_nothing(seeded: Settings, monkeypatch, capsys):
    held = hold_a_publication(seeded, monkeypatch)
    state = (pointers(seeded), rows(seeded), moves(seeded))
    live = state[0][0]

    with pytest.raises(SystemExit) as usage:  # an approval says why
        cli.main(["publish", "approve", held])
    assert usage.value.code == 2
    for version, expected in [
        ("20991231-000042", "no publication 20991231-000042 under prefix"),
        ("not-a-version", "is not a publication version"),
        (live, f"publication {live} is live, not held"),
    ]:
        assert cli.main(["publish", "approve", version, "--reason", "try"]) == 1
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert error.startswith("error: ApprovalRefused:") and expected in error
    with open_stores(seeded) as stores, pytest.raises(publish.ApprovalRefused, match="a reason is required"):
        publish.approve_publication(stores.engine, stores.redis, seeded.redis_prefix, held, reason=" ", actor="t")

    assert (pointers(seeded), rows(seeded), moves(seeded)) == state


def test_approving_a_held_version_older_than_the_live_one_is_refused(seeded: Settings):
    live = inference_flow(as_of=AS_OF)
    prefix = seeded.redis_prefix
    with open_stores(seeded) as stores:
        older = publish.begin_publication(stores.redis, prefix, EARLIER)
        publish.write_recommendations(stores.redis, prefix, older, pl.DataFrame({"user_id": [1], "items": [[5, 6]]}))
        publish.write_fallback(stores.redis, prefix, older, [5, 6])
        metadata = {"model_version": "m:1", "generated_at": "2026-11-16T05:00:00+00:00", "n": 2,
                    "fallback_user_count": 0, "feature_as_of": str(EARLIER)}  # fmt: skip
        with pytest.raises(publish.PublicationHeld, match="recommended items are not in the snapshot's item table"):
            publish.finish_publication(
                stores.redis, prefix, older, expected_users=1, metadata=metadata,
                bounds=CheckBounds(max_unknown_items=0), catalogue=pl.Series([1, 2], dtype=pl.Int64),
            )  # fmt: skip

        with pytest.raises(publish.ApprovalRefused, match=f"held publication {older} is older than the live"):
            publish.approve_publication(stores.engine, stores.redis, prefix, older, reason="r", actor="t")

    assert pointers(seeded)[0] == live["version"] and status_in_redis(seeded, older) == "held"


def test_resolve_flows_do_what_the_cli_does_and_record_the_flow_run(seeded: Settings, seed: Seed, monkeypatch):
    held = hold_a_publication(seeded, monkeypatch)
    first = pointers(seeded)[0]

    assert publication_approve_flow(version=held, reason="checked by hand") == held
    assert publication_rollback_flow(reason="back to the model's lists") == first

    assert pointers(seeded)[:2] == (first, held)
    *_, approve, rollback = moves(seeded)
    assert approve[:3] == ("approve", first, held) and approve[4].startswith("prefect:")
    assert rollback[:4] == ("rollback", held, first, "back to the model's lists")
    assert rollback[4].startswith("prefect:") and rollback[4] != approve[4]

    with open_stores(seeded) as stores:
        from benchmarks.inference_bench import register_champion

        register_champion(stores.engine, seeded.model_name, seed.model, seed.categories, AS_OF)
    assert model_rollback_flow(reason="v2 looks off") == 1
    assert model_promote_flow(version=2, reason="v2 was fine") == 2
    with open_stores(seeded) as stores:
        history = registry.history(stores.engine, seeded.model_name)
    assert history.select("from_version", "to_version", "reason").rows()[-2:] == [
        (2, 1, "v2 looks off"),
        (1, 2, "v2 was fine"),
    ]
    assert all(actor.startswith("prefect:") for actor in history["actor"][-2:])


def test_a_resolve_flow_without_a_reason_fails_with_one_line_and_changes_nothing(seeded: Settings):
    inference_flow(as_of=AS_OF)
    second = inference_flow(as_of=AS_OF)

    state = publication_rollback_flow(reason="", return_state=True)

    assert state.is_failed() and state.message.startswith("ApprovalRefused:") and "reason is required" in state.message
    assert pointers(seeded)[0] == second["version"]
