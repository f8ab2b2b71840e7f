"""Sphinx configuration: the README is the guide, docstrings the API."""

from importlib.metadata import version as _version

project = "wsgi_scoped"
author = "The wsgi_scoped developers"
release = _version("wsgi_scoped")
version = ".".join(release.split(".")[:2])

# No intersphinx: the docs build offline, in CI as anywhere.
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
exclude_patterns = ["_build"]
