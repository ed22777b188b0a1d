"""Offline servicing of a root directory: packages, drivers, features, generalize, health.

Empty until its first operations land; the layer contracts (pyproject.toml,
[tool.importlinter]) already place it: it may import the imagefs library, and is imported
by the daemon (whose api_*.py wrap its functions as methods) and the CLI.  It never imports
the daemon or the CLI.
"""
