from logging.config import fileConfig

from alembic import context
from notes import Base
from notes import db

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)

target_metadata = Base.metadata

if context.is_offline_mode():  # alembic upgrade --sql: prints the SQL
    context.configure(url=db.engine.url, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    with db.engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
