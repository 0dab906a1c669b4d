"""A local stand-in for CML's `cml` package, for tests only (see workers_v1.py); not the service."""
