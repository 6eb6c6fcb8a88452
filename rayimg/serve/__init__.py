"""The HTTP service's Ray-free parts: request schema, limits, adapter resolution, image cache,
metrics and the web page. ``serving/app.py`` wires them into Ray Serve."""
