"""Two tenants' sessions under the same id survive a snapshot and a restart each with its own seq, and the
per-tenant session count is restored with them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lstm_client import AsyncClient, ResourceExhausted, RetryPolicy
from lstm_serve.app import App
from lstm_serve.service.auth import token_hash
from tests.servers import model_repository, test_settings

TOKENS = {"alice": "a-token-1", "bob": "b-token-2"}


def test_tenants_survive_a_snapshot(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{t}:{token_hash(v)}\n" for t, v in TOKENS.items()))
    settings = test_settings(
        model_repository(tmp_path / "models"),
        snapshot=tmp_path / "s.snap",
        tokens_file=tokens,
        max_sessions_per_tenant=1,
    )

    async def phase(first: bool) -> tuple[int, int]:
        app = App(settings)
        await app.start()
        try:
            target = f"127.0.0.1:{app.port}"
            async with (
                AsyncClient(target, retry=RetryPolicy(budget=0), token=TOKENS["alice"]) as alice,
                AsyncClient(target, retry=RetryPolicy(budget=0), token=TOKENS["bob"]) as bob,
            ):
                if first:
                    a = await alice.create_session("elnino", session_id="dev")
                    b = await bob.create_session("elnino", session_id="dev")
                    await a.step([0.5])
                    await a.step([0.5])
                    await b.step([0.5])
                    return 0, 0
                seqs = ((await alice.session_info("dev")).seq, (await bob.session_info("dev")).seq)
                with pytest.raises(ResourceExhausted):  # the per-tenant count was restored too
                    await alice.create_session("elnino", session_id="other")
                return seqs
        finally:
            await app.stop(grace=0.5)

    asyncio.run(phase(True))
    assert asyncio.run(phase(False)) == (2, 1)
