"""Serving: the published adapters (and prompts without one) behind an OpenAI-compatible Ray Serve app.

``build_app`` is the application builder (``serve run genpi.serve:build_app``); ``genpi serve``
runs it on a local Ray cluster.
"""

from genpi.serve.app import application, build_app

__all__ = ["application", "build_app"]
