"""A tokens file caught mid-rewrite (truncated, not yet written) does not revoke every token; the tokens loaded
before stay in force until the file is whole again. (Found in review.)"""

from __future__ import annotations

from pathlib import Path

from lstm_serve.service.auth import Tokens, token_hash


def test_a_truncated_tokens_file_revokes_everyone(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice:{token_hash('t-alice')}\n")
    now = [0.0]
    tokens = Tokens(path, clock=lambda: now[0])
    assert tokens.tenant("t-alice") == "alice"
    with open(path, "w"):  # the first half of an in-place rewrite: truncated, new content not written yet
        pass
    now[0] += 2
    tokens.refresh()
    assert tokens.tenant("t-alice") == "alice", "a half-rewritten tokens file revoked every token"
