"""`lstm-serve serve | inspect | convert | health | settings-reference`.

The `serve` flags are generated from lstm_serve.config.Settings: each field is a --flag and an LSTM_SERVE_* variable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import prometheus_client
import pydantic

from lstm_serve import __version__
from lstm_serve.config import Settings
from lstm_serve.errors import ModelLoadError


def _default(name: str) -> Any:
    field = Settings.model_fields[name]
    return field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"LSTM_SERVE_{name.upper()}"
        default = _default(name)
        help_text = f"{field.description} [env {env}; default {default}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(field.annotation) is list:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar="A,B", help=help_text)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    from lstm_serve import logs
    from lstm_serve.app import App, StartupError

    try:
        settings = settings_from_args(args)
    except pydantic.ValidationError as exc:
        print(f"lstm-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_json)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double what a scrape stores
    try:
        if settings.workers > 1:
            from lstm_serve.workers import Supervisor

            return Supervisor(settings).run()
        asyncio.run(App(settings).run_until_signal())
    except (StartupError, OSError) as exc:
        print(f"lstm-serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Loads PATH as the server would (a model directory, or an npz file): a file it refuses is one line on stderr
    and exit code 1, never a traceback, whatever the file holds."""
    from lstm_serve.engine.files import one_line
    from lstm_serve.engine.model import Model
    from lstm_serve.engine.npz import load_npz
    from lstm_serve.engine.numpy_backend import NumpyBackend
    from lstm_serve.engine.repository import load_latest

    path: Path = args.path
    try:
        if path.is_dir():
            model = load_latest(path)
        else:
            weights = load_npz(path)
            model = Model.from_weights(path.stem, weights, NumpyBackend(weights))
    except ModelLoadError as exc:
        print(f"lstm-serve inspect: {one_line(exc.message, 2000)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a case the loaders did not foresee: still one line
        print(f"lstm-serve inspect: {path}: cannot load ({type(exc).__name__}: {one_line(str(exc))})", file=sys.stderr)
        return 1
    info = model.info
    L, H = info.num_layers, info.hidden_size
    lines = [f"model        {info.name} (version {info.version}, backend {info.backend})"]
    if info.description:
        lines.append(f"description  {info.description}")
    lines += [
        f"input        {info.input_size} features {list(info.input_features) or ''}",
        f"layers       {L} x LSTM(hidden={H})",
        f"output       {info.output_size} {list(info.output_features) or ''}",
        f"normalized   {info.normalized}",
        f"parameters   {info.parameters}",
        f"state        2 x {L} x {H} float32 = {2 * L * H * 4} bytes per session",
    ]
    print("\n".join(line.rstrip() for line in lines))
    return 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _convert(args: argparse.Namespace) -> int:
    """Like inspect: a source it refuses is one line on stderr and exit code 1, never a traceback."""
    from lstm_serve.convert import ConvertOptions, convert
    from lstm_serve.engine.files import one_line

    stats = {k: getattr(args, k) for k in ("input_mean", "input_std", "output_mean", "output_std") if getattr(args, k)}
    options = ConvertOptions(
        source_format=args.source_format,
        backend=args.backend,
        name=args.name,
        description=args.description,
        version=args.model_version,
        prefix=args.prefix,
        head_prefix=args.head_prefix,
        input_features=args.input_features,
        output_features=args.output_features,
        normalization=stats,
        force=args.force,
    )
    try:
        out, error = convert(args.source, args.out, options)
    except ModelLoadError as exc:
        print(f"lstm-serve convert: {one_line(exc.message, 2000)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a case the readers did not foresee: still one line
        print(
            f"lstm-serve convert: {args.source}: cannot convert ({type(exc).__name__}: {one_line(str(exc))})",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {out} (backend {args.backend}); checked against the source weights: max difference {error:.1e}")
    return 0


def local_target() -> str:
    """The address `serve` listens on per LSTM_SERVE_HOST and LSTM_SERVE_PORT (the defaults without them), a wildcard
    host asked on loopback: the default of `health --target`, so that an image's fixed HEALTHCHECK command follows a
    port configured through the environment instead of probing a fixed one (on a host network, someone else's)."""
    host = os.environ.get("LSTM_SERVE_HOST") or str(_default("host"))
    port = os.environ.get("LSTM_SERVE_PORT") or str(_default("port"))
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lstm_client.tls import TlsConfig

    if (args.tls_cert is None) != (args.tls_key is None):
        print("lstm-serve health: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        if args.tls or args.tls_ca or args.tls_cert or args.tls_server_name:
            tls = TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
            channel = grpc.secure_channel(args.target, tls.credentials(), options=tls.options())
        else:
            channel = grpc.insecure_channel(args.target)
    except OSError as exc:
        print(f"lstm-serve health: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def settings_reference() -> str:
    """The configuration table of docs/operations.md, generated so that the docs cannot drift from the code."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = _default(name)
        flag = "--" + name.replace("_", "-")
        rows.append(f"| `{flag}` | `LSTM_SERVE_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows) + "\n"


def _reference(args: argparse.Namespace) -> int:
    print(settings_reference(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-serve", description="Stateful LSTM sequence prediction over gRPC.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the models of a model repository")
    _add_settings_flags(serve)
    serve.set_defaults(func=_serve)
    inspect = sub.add_parser("inspect", help="summarise a model directory or an .npz weights file")
    inspect.add_argument("path", type=Path)
    inspect.set_defaults(func=_inspect)
    convert = sub.add_parser(
        "convert",
        help="turn a PyTorch / Keras / ONNX / npz model into a served model directory",
        description="Writes OUT/model.npz (or model.onnx) and OUT/model.toml, then checks the result against the "
        "source weights. Sources: .safetensors or .pt (PyTorch state_dict of nn.LSTM + optional nn.Linear), .keras or "
        ".weights.h5 (Keras 3), .onnx (native LSTM nodes), .npz (format v1).",
    )
    convert.add_argument("source", type=Path)
    convert.add_argument("out", type=Path, help="model directory to write (its name is the model name)")
    convert.add_argument("--from", dest="source_format", choices=("pytorch", "keras", "onnx", "npz"))
    convert.add_argument("--backend", choices=("numpy", "onnx"), default="numpy", help="artifact to write")
    convert.add_argument("--name", help="model name (default: the directory name)")
    convert.add_argument("--description", default="")
    convert.add_argument(
        "--version",
        "--model-version",
        dest="model_version",
        type=int,
        default=None,
        help="version to write, OUT/VERSION/ (default: one past the highest version in OUT)",
    )
    convert.add_argument("--prefix", help="PyTorch: key prefix of the nn.LSTM, e.g. 'lstm.'")
    convert.add_argument("--head-prefix", help="PyTorch: key prefix of the nn.Linear head, e.g. 'head.'")
    convert.add_argument("--input-features", type=_names, default=(), metavar="A,B")
    convert.add_argument("--output-features", type=_names, default=(), metavar="Y")
    for stat in ("input-mean", "input-std", "output-mean", "output-std"):
        convert.add_argument(f"--{stat}", type=_floats, metavar="V1,V2", help="normalisation statistics")
    convert.add_argument("--force", action="store_true", help="replace OUT if it exists")
    convert.set_defaults(func=_convert)
    health = sub.add_parser("health", help="ask a server's gRPC health service; exit 0 when SERVING")
    health.add_argument(
        "--target", default=local_target(), help="HOST:PORT [default: LSTM_SERVE_HOST (wildcard: loopback) and _PORT]"
    )
    health.add_argument("--service", default="", help="service name; empty = the whole server")
    health.add_argument("--timeout", type=float, default=3.0)
    # TLS options default from the environment, so that an image's fixed HEALTHCHECK command works once TLS is on
    health.add_argument("--tls", action="store_true", help="connect over TLS (implied by the options below)")
    for option, meaning in (
        ("ca", "CA certificate(s) of the server's certificate (default: the system's roots)"),
        ("cert", "client certificate chain, for a server requiring mutual TLS"),
        ("key", "the client certificate's private key"),
        ("server-name", "check the server's certificate for this name instead of the target's host"),
    ):
        env = f"LSTM_SERVE_HEALTH_TLS_{option.upper().replace('-', '_')}"
        health.add_argument(f"--tls-{option}", default=os.environ.get(env) or None, help=f"{meaning} [env {env}]")
    health.set_defaults(func=_health)
    reference = sub.add_parser("settings-reference", help="print the configuration table of docs/operations.md")
    reference.set_defaults(func=_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
