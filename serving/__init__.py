"""The HTTP service on Ray Serve: ``app.py`` (ingress and generator deployments, ``start``,
``app_builder`` for ``serve deploy serving/config.yaml``), the request schema and its limits,
API errors, the image cache, Prometheus metrics and the web page."""
