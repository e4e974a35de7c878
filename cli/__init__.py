"""`recsys`: the command line, at the top beside flows and deployments."""
