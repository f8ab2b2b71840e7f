from __future__ import annotations

import inspect

import wsgi_scoped


def test_all_lists_exactly_the_public_names() -> None:
    # pytest's assertion rewriting of plugin packages adds "@py_builtins".
    public = sorted(
        name
        for name in vars(wsgi_scoped)
        if name.isidentifier() and not name.startswith("_")
    )
    modules = {
        "database",
        "deadline",
        "exceptions",
        "flask",
        "health",
        "middleware",
        "observe",
        "pytest_plugin",
        "replicas",
        "scope",
        "transaction",
    }
    assert sorted(wsgi_scoped.__all__) == sorted(set(public) - modules)
    assert wsgi_scoped.__all__ == sorted(wsgi_scoped.__all__)


def test_public_names_are_documented() -> None:
    for name in wsgi_scoped.__all__:
        value = getattr(wsgi_scoped, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            doc = inspect.getdoc(value) or ""
            assert ".. versionadded::" in doc, name


def test_readme_lists_every_public_name() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    for name in wsgi_scoped.__all__:
        assert f"``{name}" in readme, name
