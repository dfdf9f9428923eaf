"""Components written outside ``src/``, each one file registered by one line: the proof that a new
component needs nothing else (``tests/test_toy_components.py``)."""
