"""Ray Serve wiring of rayimg (see serving/app.py)."""
