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


def _link_to_pages(app, doctree, docname):
    """Point the README's links to files of the repository (``CHANGES.rst``,
    ``docs/migrating.rst``) at the pages built from them: the HTML has no
    ``.rst`` files. A link to a file that has no page is a warning."""
    from docutils import nodes
    from sphinx.util import logging

    for node in doctree.findall(nodes.reference):
        uri = node.get("refuri", "")
        if "://" in uri or not uri.endswith(".rst"):
            continue
        page = uri.removeprefix("docs/").removesuffix(".rst").lower()
        if page in app.env.found_docs:
            node["refuri"] = app.builder.get_relative_uri(docname, page)
        else:
            logging.getLogger(__name__).warning(
                "%r links to %s, which has no page in the docs", docname, uri
            )


def setup(app):
    app.connect("doctree-resolved", _link_to_pages)
