"""The LightGBM LambdaRank ranker: labelled frames in, a model text out."""

from dataclasses import dataclass, field
from datetime import date

import lightgbm as lgb
import numpy as np
import polars as pl

from ranking.candidates import CATEGORICAL_FEATURES, FEATURE_NAMES, MONOTONE_FEATURES
from ranking.scoring import prior_scores
from recsys.settings import default_of


@dataclass(frozen=True)
class RankerParams:
    """LightGBM parameters; deterministic given the seed and thread count (Settings' by default)."""

    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_child_samples: int = 50
    colsample_bytree: float = 1.0
    early_stopping_rounds: int = 30
    # LambdaRank scores pairs only within the top `truncation_level` of the current ranking
    # (LightGBM's default is 30). Boosting starts from the popularity prior, so a positive
    # of little popularity starts far down the list: every pair must count to lift it.
    truncation_level: int = 10_000
    monotone: bool = True
    # After early stopping picked the number of trees, fit again with that many on the training and
    # validation weeks together: the validation weeks are the latest labelled ones, the closest to
    # the weeks the model will score, and with a few dozen users per week every group counts.
    refit: bool = True
    seed: int = default_of("seed")
    num_threads: int = default_of("num_threads")

    def lightgbm_kwargs(self) -> dict:
        constraints = [MONOTONE_FEATURES.get(name, 0) if self.monotone else 0 for name in FEATURE_NAMES]
        return {
            "objective": "lambdarank",
            "n_estimators": self.n_estimators,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_child_samples": self.min_child_samples,
            "colsample_bytree": self.colsample_bytree,
            "monotone_constraints": constraints,
            "lambdarank_truncation_level": self.truncation_level,
            "random_state": self.seed,
            "n_jobs": self.num_threads,
            "deterministic": True,
            "force_row_wise": True,
            "verbose": -1,
        }


@dataclass(frozen=True)
class TrainedRanker:
    """A trained model as LightGBM text, with what inference needs to use it identically."""

    model_text: str
    feature_names: list[str]
    best_iteration: int
    params: dict
    feature_importance: dict[str, float] = field(default_factory=dict)
    # NDCG@10 on the validation weeks at the best iteration, the mean over their (week, user) groups
    # (what early stopping and tuning compare).
    validation_ndcg: float = float("nan")


def attach_labels(ranking_frame: pl.DataFrame, labels: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Label candidates 1 when the user consumed the (new) item in the following week.

    Groups without any positive carry no ranking signal and are dropped.
    """
    positives = labels.filter(pl.col("is_new")).select("user_id", "item_id", pl.lit(1, pl.Int32).alias("label"))
    return (
        ranking_frame.join(positives, on=["user_id", "item_id"], how="left")
        .with_columns(pl.col("label").fill_null(0), pl.lit(as_of).alias("as_of"))
        .filter(pl.col("label").max().over("user_id") > 0)
    )


def sample_negatives(labelled: pl.DataFrame, per_user: int, seed: int) -> pl.DataFrame:
    """Keep every positive and a fixed-seed random `per_user` negatives of each (week, user).

    LambdaRank cost grows with group size; most candidates are easy negatives.
    """
    draw = pl.struct("user_id", "item_id").hash(seed=seed)
    negative_rank = pl.when(pl.col("label") == 0).then(draw).rank("ordinal").over("as_of", "user_id")
    return labelled.filter((pl.col("label") > 0) | (negative_rank <= per_user))


def _group_sizes(frame: pl.DataFrame) -> np.ndarray:
    """The lengths of the (as_of, user_id) runs of a frame in key order: its groups, in order. (A group_by took
    0.45-0.7 GB on the 1.6M rows of a refit, for sizes these runs give in a few arrays of that length.)"""
    if frame.is_empty():
        return np.zeros(0, dtype=np.int64)
    week, user = (frame.get_column(c).to_physical().to_numpy() for c in ("as_of", "user_id"))
    starts = np.flatnonzero((np.diff(week) != 0) | (np.diff(user) != 0)) + 1
    return np.diff(np.concatenate(([0], starts, [frame.height])))


def train_ranker(train: pl.DataFrame, valid: pl.DataFrame, params: RankerParams) -> TrainedRanker:
    """Fit LambdaRank on labelled weeks, early-stopping on separate validation weeks (`valid`: one or
    several weeks, each (week, user) a group, pooled); with `params.refit`, fit that many trees again
    on the training and validation weeks together.

    Boosting starts from the popularity prior (`PRIOR_FEATURE`), so the trees learn
    corrections to recent popularity: with few (user, week) groups an early stop leaves
    the model at the popularity ranking instead of a coarse few-tree step function.
    `validation_ndcg` is the early-stopped fit's, on weeks it did not train on.
    """
    if train.is_empty() or valid.is_empty():
        raise ValueError(
            f"training needs labelled candidates in both the training weeks ({train.height} rows) "
            f"and the validation week(s) ({valid.height} rows); compute more feature snapshots first"
        )
    train, valid = in_key_order(train), in_key_order(valid)
    model = lgb.LGBMRanker(**params.lightgbm_kwargs())
    model.fit(
        **_fit_arguments(train),
        eval_X=(valid[FEATURE_NAMES],),
        eval_y=(valid.get_column("label").to_numpy(),),
        eval_group=[_group_sizes(valid)],
        eval_at=[10],
        eval_init_score=[prior_scores(valid, FEATURE_NAMES)],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
        **_FIT_OPTIONS,
    )
    best = model.best_iteration_ or params.n_estimators
    validation_ndcg = float(model.best_score_["valid_0"]["ndcg@10"])
    if params.refit:
        del model  # its binned datasets go before the refit's matrix is built
        model = lgb.LGBMRanker(**(params.lightgbm_kwargs() | {"n_estimators": best}))
        model.fit(**_fit_arguments(pl.concat([train, valid], how="vertical_relaxed")), **_FIT_OPTIONS)
    importance = dict(zip(FEATURE_NAMES, model.booster_.feature_importance("gain").tolist(), strict=True))
    return TrainedRanker(
        model_text=model.booster_.model_to_string(num_iteration=best),
        feature_names=list(FEATURE_NAMES),
        best_iteration=best,
        params=params.lightgbm_kwargs()
        | {"early_stopping_rounds": params.early_stopping_rounds, "refit": params.refit},
        feature_importance=importance,
        validation_ndcg=validation_ndcg,
    )


KEY = ("as_of", "user_id", "item_id")


def in_key_order(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` sorted by (as_of, user_id, item_id): itself when it already is (labelled frames are built in
    that order), so a fit does not hold a sorted copy of every training row beside the caller's frame."""
    ordered = pl.col(KEY[-1]).diff() >= 0  # each row's key >= the previous row's, lexicographically
    for key in reversed(KEY[:-1]):
        step = pl.col(key).to_physical().diff()
        ordered = (step > 0) | ((step == 0) & ordered)
    return frame if frame.select(ordered.slice(1).all()).item() else frame.sort(*KEY)


_FIT_OPTIONS = {"feature_name": FEATURE_NAMES, "categorical_feature": CATEGORICAL_FEATURES}


def _fit_arguments(frame: pl.DataFrame) -> dict:
    """LightGBM's X, y, groups and init_score (the prior) of a frame sorted by (as_of, user_id, item_id).

    X is the frame's feature columns themselves: LightGBM reads them through Arrow and bins each value as the
    float64 it widens to, the values of `feature_matrix` (the same model text), without a float64 copy of
    every training row beside the frame. Taken with `frame[...]`, which keeps the columns' chunks (the weeks'
    frames stacked): `select` would copy them into one chunk."""
    return {
        "X": frame[FEATURE_NAMES],
        "y": frame.get_column("label").to_numpy(),
        "group": _group_sizes(frame),
        "init_score": prior_scores(frame, FEATURE_NAMES),
    }
