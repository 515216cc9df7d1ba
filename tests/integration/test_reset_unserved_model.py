"""ResetSession of a session whose model this process does not serve (restored from a snapshot after the model was
removed, or a Redis replica started with a subset of --models) answers NOT_FOUND with the reason, as Step does. (It
crashed with KeyError -> INTERNAL.)"""

from __future__ import annotations

import time

import numpy as np
import pytest

from lstm_serve.dataplane import DataPlane
from lstm_serve.engine.repository import Repository
from lstm_serve.errors import LstmServeError
from lstm_serve.metrics import Metrics
from lstm_serve.sessions import MemorySessionStore, Session
from tests.small_models import model


async def test_reset_of_a_session_whose_model_is_not_served_is_a_domain_error() -> None:
    repo = Repository(models={"a": model("a", 3, 5)}, failures={"gone": "weights file missing"})
    store = MemorySessionStore(max_sessions=10, default_ttl=0)
    now = time.time()
    store.restore([Session("s", "gone", bytes(40), now, now, 0.0)], [])  # as App._restore keeps it
    plane = DataPlane(repo, store, Metrics())
    with pytest.raises(LstmServeError):  # Step gives ModelNotFound here
        await plane.step("s", 1, np.ones(3, np.float32))
    try:
        await plane.reset_session("s")
    except LstmServeError:
        pass
    except Exception as exc:
        pytest.fail(f"ResetSession crashed (INTERNAL): {type(exc).__name__}: {exc}")
