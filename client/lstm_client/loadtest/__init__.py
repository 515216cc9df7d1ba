"""`lstm-loadtest`: drives an lstm-serve deployment with many concurrent sessions and reports what it carried.

Bounded by design: a fixed number of sessions and steps, and a wall-clock limit; it only talks to the target it is
given. Usable from Python too: `asyncio.run(run_load(LoadConfig(target=..., model=...)))`.
"""

from lstm_client.loadtest.report import LoadResult
from lstm_client.loadtest.runner import LoadConfig, run_load

__all__ = ["LoadConfig", "LoadResult", "run_load"]
