"""The first hour of a new user, following README.rst literally: the extras it
names install what its URLs and the benchmarks need, its testing sample
passes on a database that has rows, and the built docs have no dead links.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import typing as t
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from sqlalchemy.engine import make_url
from support import EXAMPLES

ROOT = EXAMPLES.parent
README = (ROOT / "README.rst").read_text()


def extra(name: str) -> set[str]:
    """The distributions ``pyproject.toml`` puts in the extra ``name``."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"].get(name, [])
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def provides(distribution: str, module: str) -> bool:
    """Whether the installed ``distribution`` has the (dotted) ``module``."""
    path = module.replace(".", "/")
    files = importlib.metadata.distribution(distribution).files or []
    return any(f"{f}" == f"{path}.py" or f"{f}".startswith(f"{path}/") for f in files)


def section(title: str) -> str:
    """The text of the README section ``title``, up to the next section."""
    start = README.index(f"\n{title}\n")
    end = re.search(r"\n[^\n]+\n[-~]{3,}\n", README[start + len(title) + 2 :])
    return README[start : start + len(title) + 2 + (end.start() if end else 0)]


@pytest.mark.parametrize(
    ("name", "url"),
    [
        pytest.param("postgresql", "postgresql+psycopg://app@localhost/app"),
        pytest.param("mysql", "mysql+pymysql://app@localhost/app"),
    ],
)
def test_driver_extra_installs_the_driver_of_the_readme_url(
    name: str, url: str
) -> None:
    """``pip install 'wsgi_scoped[postgresql]'`` gives what the README's
    ``postgresql+psycopg://`` URL imports (not ``No module named 'psycopg'``),
    and the README says so where a new user installs."""
    module = make_url(url).get_dialect().import_dbapi().__name__
    assert [d for d in extra(name) if provides(d, module)], (name, module)
    assert f"pip install 'wsgi_scoped[{name}]'" in section("Installation")
    assert f"'.[examples,{name}]'" in section("Quick start")


def benchmark_imports() -> t.Iterator[tuple[str, str]]:
    """(script, module) for what each script in benchmarks/ imports, includes
    with Pyramid's ``config.include()`` or runs with ``python -m``."""
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                yield from ((script.name, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield script.name, node.module
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "include":  # config.include("pyramid_tm")
                    yield from ((script.name, a.value) for a in node.args if _str(a))
            elif isinstance(node, ast.List):
                items = [e.value for e in node.elts if _str(e)]  # ["-m", "gunicorn"]
                pairs = zip(items, items[1:], strict=False)
                yield from ((script.name, b) for a, b in pairs if a == "-m")


def _str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_benchmarks_extra_provides_what_the_benchmarks_use() -> None:
    """``pip install -e '.[benchmarks]'``, as the README says, is enough to
    run benchmarks/*.py (not ``No module named 'flask_sqlalchemy'``)."""
    assert "pip install -e '.[benchmarks]'" in section("Docs and benchmarks")
    # Scripts of benchmarks/, and helpers they share with tests/ (the proxy).
    local = {p.stem for d in ("benchmarks", "tests") for p in (ROOT / d).glob("*.py")}
    core = {"sqlalchemy", "wsgi_scoped"}  # the package and its dependency
    distributions = extra("benchmarks")
    missing = set()
    for script, module in benchmark_imports():
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top in local or top in core:
            continue
        if not any(provides(d, module) for d in distributions):
            missing.add(f"{script} uses {module}")
    assert not missing, (
        f"No distribution of the 'benchmarks' extra provides these: {sorted(missing)}."
        " Add them to [project.optional-dependencies] benchmarks in pyproject.toml."
    )


def readme_python_blocks(title: str) -> list[str]:
    """The ``.. code-block:: python`` blocks of the README section ``title``."""
    blocks = re.findall(
        r"\n\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section(title) + "\n"
    )
    return [re.sub(r"(?m)^    ", "", block).strip() + "\n" for block in blocks]


def test_readme_testing_sample_passes_on_a_database_with_rows(
    pytester: pytest.Pytester,
    load_example: t.Callable[[str], ModuleType],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's ``conftest.py`` and test, as written, against the todo
    demo (as ``myapp``) on a database that already has todos."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'rows.sqlite3'}")
    todo = load_example("todo")
    with todo.db.engine.begin() as connection:
        connection.execute(todo.Todo.__table__.insert(), [{"title": "old"}] * 3)
    todo.db.engine.dispose()
    conftest, test = readme_python_blocks("Testing with the pytest plugin")[:2]
    assert "from myapp import" in conftest and "def test_" in test
    myapp = f"import sys\nsys.path.insert(0, {str(EXAMPLES)!r})\nfrom todo import *\n"
    pytester.makepyfile(
        myapp=myapp,
        conftest=conftest,
        test_readme=test,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
    with todo.db.engine.connect() as connection:  # rolled back: still 3 rows
        assert len(connection.execute(todo.Todo.__table__.select()).all()) == 3


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("href", "src") and v]


def test_built_docs_have_no_dead_relative_links(tmp_path: Path) -> None:
    """The README is the docs' index page, and its links to ``CHANGES.rst``
    and ``docs/migrating.rst`` lead to their pages, not to missing files."""
    pytest.importorskip("sphinx", reason="sphinx is not installed")
    (line,) = re.findall(r"(?m)^    \.venv/bin/python (-m sphinx .*)$", README)
    out = tmp_path / "html"
    command = [sys.executable, *line.replace("docs/_build/html", str(out)).split()]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)  # the README's
    dead = []
    for page in out.glob("*.html"):
        parser = _Links()
        parser.feed(page.read_text())
        for link in parser.links:
            target = link.split("#")[0].split("?")[0]
            if target and ":" not in target and not (page.parent / target).exists():
                dead.append(f"{page.name} -> {link}")
    assert not dead
