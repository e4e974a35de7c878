"""Feature pipeline: raw events in, point-in-time correct feature tables out."""
