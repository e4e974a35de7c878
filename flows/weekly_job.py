"""The whole weekly job in one process: the three flows in the order their schedules run them."""

from datetime import date

from flows.feature_flow import feature_flow
from flows.inference_flow import inference_flow
from flows.training_flow import training_flow
from recsys.settings import Settings


def run_weekly_job(settings: Settings, as_of: date, source: str | None) -> tuple[dict, dict]:
    """Features for every week training needs (as the scheduled feature run), then training, then inference."""
    feature_flow(as_of=as_of, source=source, backfill_history=True)
    trained = training_flow(as_of=as_of)
    published = inference_flow(as_of=as_of)
    return trained, published
