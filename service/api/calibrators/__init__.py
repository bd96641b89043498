"""``GET /calibrators``: the calibrator versions."""
