"""leasehold-client: tell Leasehold when tasks start and end, and claim their
just-in-time credentials.

    from leasehold_client import Client

    lh = Client()  # LEASEHOLD_URL, LEASEHOLD_KEY
    with lh.task("nightly/extract/try-1", grants={"db": "reports-readonly"},
                 max_duration=600) as t:
        secret = t.credential("db")

Celery apps: `leasehold_client.celery` (`pip install 'leasehold-client[celery]'`).
"""

from ._base import LeaseholdError, TaskAnswer
from .aio import AsyncClient, AsyncTaskRun
from .client import Client, TaskRun

__all__ = ["AsyncClient", "AsyncTaskRun", "Client", "LeaseholdError", "TaskAnswer", "TaskRun"]
__version__ = "0.1.0"
