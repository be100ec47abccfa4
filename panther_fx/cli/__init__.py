"""The ``panther-fx`` command line."""
