"""``GET /scores``: the most recent scores and their feedback."""
