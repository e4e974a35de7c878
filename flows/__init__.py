"""The three Prefect flows: they only wire the pipelines' functions together."""
