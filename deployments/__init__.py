"""The three weekly deployments and the process that serves them."""
