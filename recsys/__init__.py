"""weekly-recs entry points: settings, store connections, CLI."""
