"""Per-test cost of the pytest plugin's isolation (a transaction rolled back
at teardown) against dropping and re-creating the tables, on SQLite and, when
TEST_POSTGRESQL_URL is set, PostgreSQL.

    python benchmarks/isolation.py [--tests 50] [--rounds 7] [--tables 10]

Each simulated test writes one row through a session and reads it back.
Interleaved rounds, medians, ratios; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import typing as t

import sqlalchemy
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.orm import Session


def schema(tables: int) -> tuple[MetaData, Table]:
    metadata = MetaData()
    created = [
        Table(
            f"bench_{n}",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("name", String(50)),
        )
        for n in range(tables)
    ]
    return metadata, created[0]


def a_test(session: Session, table: Table) -> None:
    session.execute(table.insert().values(name="x"))
    session.commit()
    assert session.scalar(select(func.count()).select_from(table)) == 1


def recreate(engine: Engine, metadata: MetaData, table: Table) -> None:
    metadata.create_all(engine)
    with Session(engine) as session:
        a_test(session, table)
    metadata.drop_all(engine)


def rolled_back(engine: Engine, metadata: MetaData, table: Table) -> None:
    with engine.connect() as connection:
        dbapi = t.cast(t.Any, connection.connection.dbapi_connection)
        sqlite = connection.dialect.driver == "pysqlite"
        if sqlite:  # the plugin's pysqlite SAVEPOINT workaround
            dbapi.isolation_level = None
            event.listen(connection, "begin", lambda c: c.exec_driver_sql("BEGIN"))
        transaction = connection.begin()
        with Session(bind=connection, join_transaction_mode="create_savepoint") as s:
            a_test(s, table)
        transaction.rollback()
        if sqlite:  # the pooled connection goes back as it came
            dbapi.isolation_level = ""


def measure(url: str, tests: int, rounds: int, tables: int) -> dict[str, list[float]]:
    engine = create_engine(url)
    metadata, table = schema(tables)
    metadata.drop_all(engine)
    variants: dict[str, t.Callable[[Engine, MetaData, Table], None]] = {
        "drop and re-create tables": recreate,
        "rolled-back transaction": rolled_back,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for number in range(rounds + 1):  # the first round warms up
        order = list(variants.items())
        if number % 2:
            order.reverse()
        for name, run in order:
            if name == "rolled-back transaction":
                metadata.create_all(engine)
            start = time.perf_counter()
            for _ in range(tests):
                run(engine, metadata, table)
            elapsed = (time.perf_counter() - start) / tests * 1000
            if name == "rolled-back transaction":
                metadata.drop_all(engine)
            if number:
                times[name].append(elapsed)
    engine.dispose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tables", type=int, default=10)
    args = parser.parse_args()
    urls = {"SQLite (file)": f"sqlite:///{tempfile.mkdtemp()}/isolation.db"}
    if os.environ.get("TEST_POSTGRESQL_URL"):
        urls["PostgreSQL"] = os.environ["TEST_POSTGRESQL_URL"]
    print(
        f"Python {sys.version.split()[0]}, SQLAlchemy {sqlalchemy.__version__};"
        f" {args.tests} tests x {args.rounds} rounds, {args.tables} tables."
        " Noisy 2-core machine: read the ratios."
    )
    print()
    print("| database | variant | median ms/test | ratio |")
    print("|---|---|---:|---:|")
    for label, url in urls.items():
        times = measure(url, args.tests, args.rounds, args.tables)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        reference = medians["rolled-back transaction"]
        for name, median in medians.items():
            print(f"| {label} | {name} | {median:.2f} | {median / reference:.1f}x |")


if __name__ == "__main__":
    main()
