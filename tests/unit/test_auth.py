"""The pieces of authentication and per-tenant rates, without a server (tests/integration/test_security.py has them
end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lstm_serve.errors import RateLimited
from lstm_serve.service.auth import TokenFileError, Tokens, bearer_token, parse_tokens, token_hash
from lstm_serve.service.calls import TenantRates


def test_tokens_file_format() -> None:
    a, b = token_hash("a-secret"), token_hash("b-secret")
    table = parse_tokens(["# comment", "", f"  acme : {a.upper()} ", f"acme:{b}"], "f")
    assert table == {a: "acme", b: "acme"}  # hex in any case, spaces around; a tenant may have several tokens
    for bad in ("acme", f"ac/me:{a}", f":{a}", "acme:1234", f"{'x' * 65}:{a}"):
        with pytest.raises(TokenFileError, match="f:1: expected"):
            parse_tokens([bad], "f")
    with pytest.raises(TokenFileError, match="already belongs to tenant 'acme'"):
        parse_tokens([f"acme:{a}", f"other:{a}"], "f")


def test_tokens_map_to_tenants_and_the_file_is_reread(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "tokens"
    path.write_text(f"acme:{token_hash('one')}\n")
    tokens = Tokens(path, [f"fixed:{token_hash('two')}"], clock=lambda: now[0])
    assert (tokens.tenant("one"), tokens.tenant("two"), tokens.tenant("three")) == ("acme", "fixed", None)
    path.write_text(f"beta:{token_hash('three')}\n")
    tokens.refresh()
    assert tokens.tenant("three") is None  # looked at once a second at most
    now[0] = 1.5
    tokens.refresh()
    assert (tokens.tenant("one"), tokens.tenant("two"), tokens.tenant("three")) == (None, "fixed", "beta")
    path.write_text("broken\n")
    now[0] = 3.0
    tokens.refresh()  # logged; the tokens in force stay
    assert tokens.tenant("three") == "beta"
    with pytest.raises(TokenFileError, match="cannot read the tokens file"):
        Tokens(tmp_path / "missing")


def test_bearer_header() -> None:
    assert bearer_token([("x-session-id", "s"), ("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    for value in ("Basic abc", "Bearer", "Bearer ", "abc", "Bearer " + "x" * 5000):
        assert bearer_token([("authorization", value)]) is None
    assert bearer_token(None) is None


def test_tenant_rates_are_token_buckets_per_tenant() -> None:
    now = [0.0]
    rates = TenantRates(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        rates.take("acme")
    with pytest.raises(RateLimited, match=r"retry in 0\.500 s"):
        rates.take("acme")
    rates.take("other")  # a bucket of its own
    now[0] = 0.5
    rates.take("acme")  # one token back after 1 / rate seconds
    with pytest.raises(RateLimited):
        rates.take("acme")
    assert TenantRates(rate=0.5, burst=0).burst == 1.0  # 0: one second's worth, at least one request
