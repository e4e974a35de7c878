"""Training pipeline: week planning, labelled frames, the ranker, baselines, evaluation, the promotion gate."""
