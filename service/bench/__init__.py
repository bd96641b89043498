"""``ufcal bench``: what calibrated confidence costs over plain answering, against a naive
paper-style implementation, and the HTTP service's own overhead."""
