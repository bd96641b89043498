"""``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI-compatible sidecar."""
