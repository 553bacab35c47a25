"""The first schema: every table of daemon.store.models as of version 0.1."""

from daemon.store.models import MODELS


def up(db):
    # NOTE: later migrations must use playhouse.migrate operations, not the
    # current models, so that this one keeps meaning "the 0.1 schema".
    db.create_tables(MODELS)
