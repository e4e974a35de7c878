"""Training pipeline: candidates, ranker, evaluation metrics, baselines and the model registry."""
