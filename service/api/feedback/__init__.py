"""``POST /feedback`` and ``GET /calibration``: the truth for earlier scores, and the live
calibration it gives."""
