"""Serving a trained model over HTTP (the ``serve`` extra: FastAPI and uvicorn).

:mod:`reglm.serve.app` builds the service (``create_app``), :mod:`reglm.serve.batching` joins
concurrent requests into shared model calls; ``reglm serve RUN`` (:mod:`reglm.cli.serve`) runs it.
"""
