"""`lstm-loadtest TARGET --model NAME [...]`: see --help."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from lstm_client import RetryPolicy, __version__
from lstm_client.errors import LstmError
from lstm_client.loadtest.runner import LoadConfig, run_load
from lstm_client.tls import TlsConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lstm-loadtest",
        description="Load-test an lstm-serve server: N sessions x M steps, unary or streaming, bounded in time.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("target", help="host:port of the server")
    p.add_argument("--model", required=True)
    p.add_argument("--sessions", type=int, default=64, help="sessions to create and drive (default 64)")
    p.add_argument("--steps", type=int, default=200, help="time steps per session (default 200)")
    p.add_argument("--steps-per-message", type=int, default=1, help="time steps sent in one request (default 1)")
    p.add_argument("--mode", choices=("unary", "stream"), default="stream", help="Step calls or StreamSteps")
    p.add_argument("--sessions-per-stream", type=int, default=1, help="sessions sharing one stream (stream mode)")
    p.add_argument(
        "--sessions-per-message",
        type=int,
        default=1,
        help="sessions whose steps travel in one message: StepMany calls (unary) or many-session requests (stream)",
    )
    p.add_argument("--concurrency", type=int, default=0, help="sessions running at once (default: all)")
    p.add_argument("--duration", type=float, default=60.0, help="stop sending after this many seconds (default 60)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each unary call, seconds")
    p.add_argument(
        "--retry-budget",
        type=float,
        default=RetryPolicy().budget,
        metavar="SECONDS",
        help="how long a failed call (UNAVAILABLE, deadline, broken stream) is retried; 0: never "
        f"(default {RetryPolicy().budget:g})",
    )
    p.add_argument("--tls", action="store_true", help="connect over TLS (trusting the system's roots unless --tls-ca)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) of the server's certificate (implies --tls)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate chain, for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    p.add_argument("--tls-server-name", metavar="NAME", help="check the server's certificate for this name")
    p.add_argument(
        "--token",
        default=os.environ.get("LSTM_TOKEN"),
        help="bearer token sent on every call (default: $LSTM_TOKEN, which keeps it out of the process list)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--verify", action="store_true", help="check every session's outputs against Predict afterwards")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("sessions", "steps", "steps_per_message", "sessions_per_stream", "sessions_per_message"):
        if getattr(args, name) < 1:
            print(f"lstm-loadtest: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.retry_budget < 0:
        print("lstm-loadtest: --retry-budget must be >= 0", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("lstm-loadtest: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls: bool | TlsConfig = False
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    elif args.tls:
        tls = True
    config = LoadConfig(
        target=args.target,
        model=args.model,
        sessions=args.sessions,
        steps=args.steps,
        steps_per_message=args.steps_per_message,
        mode=args.mode,
        sessions_per_stream=args.sessions_per_stream,
        sessions_per_message=args.sessions_per_message,
        concurrency=args.concurrency,
        duration=args.duration,
        timeout=args.timeout,
        retry_budget=args.retry_budget,
        seed=args.seed,
        record=args.verify,
        progress=0.0 if args.quiet or args.json else 1.0,
        tls=tls,
        token=args.token or None,
    )
    try:
        result = asyncio.run(run_load(config))
    except OSError as exc:  # a certificate file that cannot be read
        print(f"lstm-loadtest: {exc}", file=sys.stderr)
        return 2
    except LstmError as exc:
        print(f"lstm-loadtest: {args.target}: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(result.json(config.as_dict()))
    else:
        streams = f", {args.sessions_per_stream} per stream" if args.mode == "stream" else ""
        header = (
            f"{args.target}  model {args.model}  {args.mode}  {args.sessions} sessions{streams}  "
            f"{args.steps_per_message} step(s)/message"
        )
        print(result.table(header))
    return 1 if result.errors or result.mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
