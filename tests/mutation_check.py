"""Check mutmut's survivors again, one at a time, against whole test files.

mutmut runs, for each mutant, only the tests its statistics say call the
mutated function. Those statistics miss calls made in a forked child or a
subprocess (the fork, gevent and pytester tests), and some calls made in
process: a mutant can "survive" that a test in the function's own test file
kills. This script applies each mutant named on the command line (from
``mutmut show``) to a clean git worktree of this checkout, runs the test files
of the mutated module there (README: Mutation testing), and prints
``killed`` or ``SURVIVED`` for each; the worktree is reset after each one.
The same tests run once without any mutant first: if they fail there, the
script stops, since a kill would mean nothing.

    .venv/bin/python tests/mutation_check.py --tree ../wsgi_scoped-check NAME ...
    .venv/bin/mutmut results | sed -n 's/: survived$//p' \\
        | xargs .venv/bin/python tests/mutation_check.py --tree ../wsgi_scoped-check

The tree is created (``git worktree add --detach``) if it does not exist, and
checked out at this checkout's HEAD: commit a new test before checking with it.
``--tests PATH ...`` runs those tests instead (pytest paths or test ids, such
as a new test written for a survivor), before the names, after ``--``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The test files that exercise each module of wsgi_scoped/.
TESTS = {
    "_arguments": [
        "test_arguments",
        "test_middleware",
        "test_database",
        "test_observe",
        "test_deadline",
    ],
    "_servers": ["test_replica_health", "test_replicas"],
    "_sockets": ["test_sockets", "test_roundtrips", "test_health"],
    "database": [
        "test_database",
        "test_replicas",
        "test_replica_health",
        "test_arguments",
    ],
    "deadline": ["test_deadline"],
    "exceptions": ["test_logging", "test_middleware"],
    "flask": ["test_flask"],
    "health": ["test_health", "test_replica_health", "test_arguments"],
    "middleware": [
        "test_middleware",
        "test_validate",
        "test_transaction",
        "test_retry",
        "test_observe",
        "test_deadline",
        "test_arguments",
        "test_scope",
    ],
    "observe": ["test_observe", "test_logging", "test_replicas"],
    "pytest_plugin": ["test_pytest_plugin", "test_with_plugin", "test_replicas"],
    "replicas": ["test_replicas", "test_replica_health"],
    "scope": ["test_scope", "test_database"],
    "transaction": [
        "test_transaction",
        "test_retry",
        "test_retry_conflicts",
        "test_middleware",
    ],
}


def mutant_diff(name: str) -> list[str]:
    """The mutant as ``mutmut show`` prints it: a diff of one function."""
    shown = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return shown.stdout.splitlines()


def apply(name: str, diff: list[str], tree: Path) -> None:
    """Change the lines the diff removes into the lines it adds, found by
    content inside the mutated function (mutmut shows a method dedented)."""
    path = tree / diff[1][4:].strip()
    function = re.sub(r"__mutmut_\d+$", "", name.rsplit(".", 1)[1])
    function = function.split("ǁ")[-1] if "ǁ" in function else function[2:]
    removed = [line[1:] for line in diff[3:] if line.startswith("-")]
    added = [line[1:] for line in diff[3:] if line.startswith("+")]
    lines = path.read_text().split("\n")
    start = next(
        i
        for i, line in enumerate(lines)
        if re.match(rf"\s*def {re.escape(function)}\(", line)
    )
    for i in range(start, len(lines)):
        if lines[i].strip() == removed[0].strip():
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            shift = len(removed[0]) - len(removed[0].lstrip())
            lines[i : i + len(removed)] = [
                indent + line[shift:] if line.strip() else line for line in added
            ]
            break
    else:
        raise LookupError(f"{name}: the mutated line is not in {path}")
    path.write_text("\n".join(lines))


def test_files(name: str, tests: list[str] | None) -> list[str]:
    """The tests that check mutant ``name``: ``tests``, else its module's."""
    module = name.split(".")[1]
    return tests or [f"tests/{each}.py" for each in TESTS.get(module, [])]


def run_tests(files: list[str], tree: Path) -> int | None:
    """pytest's exit code for ``files`` in ``tree``; None if it timed out."""
    # A mutant of the same size written within the same second as the last
    # compiled one would pass Python's bytecode check: compile afresh.
    shutil.rmtree(tree / "wsgi_scoped" / "__pycache__", ignore_errors=True)
    environ = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
            + ["-m", "not server", *files],
            cwd=tree,
            env=environ,
            capture_output=True,
            timeout=600,
        ).returncode
    except subprocess.TimeoutExpired:
        return None


def check(name: str, tree: Path, files: list[str]) -> str:
    subprocess.run(["git", "checkout", "-q", "--", "wsgi_scoped"], cwd=tree, check=True)
    try:
        apply(name, mutant_diff(name), tree)
    except (LookupError, StopIteration, subprocess.CalledProcessError) as error:
        return f"not applied ({error})"
    try:
        code = run_tests(files, tree)
    finally:
        subprocess.run(
            ["git", "checkout", "-q", "--", "wsgi_scoped"], cwd=tree, check=True
        )
    if code is None:
        return "killed (timeout)"
    return "SURVIVED" if code == 0 else "killed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument(
        "--tests",
        nargs="+",
        metavar="PATH",
        help="the tests to run (pytest paths, test ids too) instead of the"
        " module's test files",
    )
    parser.add_argument("names", nargs="+")
    arguments = parser.parse_args()
    tree = arguments.tree.resolve()
    if not tree.exists():
        add = ["git", "worktree", "add", "-q", "--detach", str(tree)]
        subprocess.run(add, cwd=ROOT, check=True)
    # The tests as committed here: commit a new test before checking with it.
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["git", "checkout", "-q", "--detach", head], cwd=tree, check=True)
    passed: set[tuple[str, ...]] = set()
    for name in arguments.names:
        files = test_files(name, arguments.tests)
        # A kill counts only if the same tests pass without the mutant.
        if tuple(files) not in passed:
            subprocess.run(["git", "checkout", "-q", "--", "wsgi_scoped"], cwd=tree)
            if run_tests(files, tree) != 0:
                sys.exit(f"{' '.join(files)} fail without any mutant: fix them first")
            passed.add(tuple(files))
        print(f"{name}: {check(name, tree, files)}", flush=True)


if __name__ == "__main__":
    main()
