"""Writes deploy/grafana/dashboards/lstm-serve.json. The panels and their PromQL live here, readable; the JSON is
what Grafana provisions. Run after editing: python deploy/grafana/make_dashboard.py (a test checks it is current)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "lstm-serve.json"
R = "$__rate_interval"
DS = {"type": "prometheus", "uid": "prometheus"}

CALLER = "INVALID_ARGUMENT|NOT_FOUND|FAILED_PRECONDITION|ALREADY_EXISTS|OUT_OF_RANGE|UNAUTHENTICATED|PERMISSION_DENIED"
SERVER = "INTERNAL|UNKNOWN|DATA_LOSS|UNAVAILABLE"


def _errors(codes: str) -> str:
    """RPCs and in-band stream requests answered with one of `codes`, per second (the split alerts.yml uses)."""
    return (
        f'sum(rate(grpc_server_handled_total{{grpc_code=~"{codes}"}}[{R}])) + '
        f'sum(rate(lstm_stream_requests_total{{code=~"{codes}"}}[{R}]))'
    )


def _quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{R}])))"


# (title, unit, [(legend, expr)], description)
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "Steps per second",
        "ops",
        [("{{model}}", f"sum by (model) (rate(lstm_steps_total[{R}]))")],
        "Time steps computed for sessions (a request of T steps counts T).",
    ),
    (
        "Requests per second",
        "reqps",
        [
            ("{{grpc_method}}", f"sum by (grpc_method) (rate(grpc_server_handled_total[{R}]))"),
            ("{{method}} requests", f"sum by (method) (rate(lstm_stream_requests_total[{R}]))"),
        ],
        "Finished RPCs by method (a stream counts once, when it ends) and the requests answered inside streams.",
    ),
    (
        "RPC latency p50",
        "s",
        [("{{method}}", _quantile(0.5, "lstm_rpc_duration_seconds", "method"))],
        "Median time from receiving a call to its reply (streams: their whole life).",
    ),
    (
        "RPC latency p99",
        "s",
        [("{{method}}", _quantile(0.99, "lstm_rpc_duration_seconds", "method"))],
        "99th percentile; the alert LstmServeStepLatencyHigh watches Step's.",
    ),
    (
        "Stream request latency",
        "s",
        [
            ("p50 {{method}}", _quantile(0.5, "lstm_stream_request_seconds", "method")),
            ("p99 {{method}}", _quantile(0.99, "lstm_stream_request_seconds", "method")),
        ],
        "Each request inside StreamSteps / ModelStreamInfer, from its arrival to its answer: the main path's latency. "
        "The alert LstmServeStreamRequestLatencyHigh watches p99.",
    ),
    (
        "Step latency split p99, by model",
        "s",
        [
            ("wait {{model}}", _quantile(0.99, "lstm_step_wait_seconds", "model")),
            ("compute {{model}}", _quantile(0.99, "lstm_step_compute_seconds", "model")),
            ("store {{model}}", _quantile(0.99, "lstm_step_store_seconds", "model")),
        ],
        "Per batch: waiting to start (queue, batching), the backend's compute, the commit to the session store. "
        "Wait high and compute low: the loop or the batcher is the bottleneck; compute high: the model.",
    ),
    (
        "Event-loop lag",
        "s",
        [
            ("p50", _quantile(0.5, "lstm_event_loop_lag_seconds", "instance")),
            ("p99 {{instance}}", _quantile(0.99, "lstm_event_loop_lag_seconds", "instance")),
        ],
        "How late the event loop runs a timer: every request waits that long before its code starts, unseen by the "
        "latencies above. Rising lag = out of CPU (alert LstmServeOverloaded).",
    ),
    (
        "Calls in flight",
        "short",
        [
            ("calls {{instance}}", "sum by (instance) (lstm_calls_in_flight)"),
            ("streams {{instance}}", "sum by (instance) (lstm_streams_open)"),
            ("draining {{instance}}", "max by (instance) (lstm_draining)"),
        ],
        "Unary calls in progress plus open streams (bounded by --max-concurrent-rpcs), and the streams among them.",
    ),
    (
        "Handled RPCs by code",
        "reqps",
        [("{{grpc_code}}", f'sum by (grpc_code) (rate(grpc_server_handled_total{{grpc_code!="OK"}}[{R}]))')],
        "Failed RPCs by gRPC status (grpc-ecosystem series: stock gRPC dashboards read them too).",
    ),
    (
        "Caller vs server errors",
        "reqps",
        [
            ("caller's (bad input, unknown session, ...)", _errors(CALLER)),
            ("server's (INTERNAL, UNAVAILABLE, ...)", _errors(SERVER)),
            ("limits (RESOURCE_EXHAUSTED)", _errors("RESOURCE_EXHAUSTED")),
            ("{{code}} in streams", f'sum by (code) (rate(lstm_stream_requests_total{{code!="OK"}}[{R}]))'),
        ],
        "RPCs and in-band stream requests, split the way the alerts split them: the caller's mistakes need a client "
        "fixed, the server's need us.",
    ),
    (
        "Active sessions",
        "short",
        [("{{model}}", "sum by (model) (lstm_sessions_active)")],
        "Live sessions per model; compare with --max-sessions.",
    ),
    (
        "Sessions ended per second",
        "ops",
        [("{{reason}}", f"sum by (reason) (rate(lstm_sessions_ended_total[{R}]))")],
        "closed by clients, expired by idle TTL, evicted at --max-sessions (evictions lose client state).",
    ),
    (
        "Batching",
        "short",
        [
            (
                "mean size {{model}}",
                f"sum by (model) (rate(lstm_batch_size_sum[{R}])) / sum by (model) (rate(lstm_batch_size_count[{R}]))",
            ),
            (
                "share of 1-step batches {{model}}",
                f'sum by (model) (rate(lstm_batch_size_bucket{{le="1.0"}}[{R}])) '
                f"/ sum by (model) (rate(lstm_batch_size_count[{R}]))",
            ),
            ("p90 size {{model}}", _quantile(0.9, "lstm_batch_size", "model")),
        ],
        "Steps per batched backend call. A share of 1-step batches near 1 under load means little batching; the "
        "buckets are whole sizes up to 4, so p90 is exact there and an upper bound above.",
    ),
    (
        "Replayed steps per second",
        "ops",
        [("{{model}}", f"sum by (model) (rate(lstm_replayed_steps_total[{R}]))")],
        "Client retries answered from the stored reply: a sign of network trouble or tight client deadlines.",
    ),
    (
        "Process CPU",
        "percentunit",
        [("{{instance}}", f'rate(process_cpu_seconds_total{{job="lstm-serve"}}[{R}])')],
        "CPU seconds per second of the server process (1.0 = one full core).",
    ),
    (
        "Process memory (RSS)",
        "bytes",
        [("{{instance}}", 'process_resident_memory_bytes{job="lstm-serve"}')],
        "Resident memory; grows with live sessions (see docs/performance.md for bytes per session).",
    ),
    (
        "Models",
        "short",
        [
            ("loaded", "sum(lstm_models_loaded)"),
            ("failed to load", "sum(lstm_model_load_failures)"),
            ("targets up", 'sum(up{job="lstm-serve"})'),
            ("versions {{state}}", "count by (state) (lstm_model_info == 1)"),
        ],
        "Models served and models that failed to load (ListModels says why); versions ready and unloading.",
    ),
    (
        "Versions served",
        "short",
        [("{{model}} v{{version}} {{backend}} {{state}} ({{instance}})", "lstm_model_info == 1")],
        "One line per model version a replica serves, with its backend and state.",
    ),
    (
        "Build",
        "short",
        [
            (
                "{{version}} python {{python}} grpc {{grpc}} numpy {{numpy}} ort {{onnxruntime}} {{instance}}",
                "lstm_build_info",
            )
        ],
        "The server's version and its libraries', per replica: a rollout shows as two lines.",
    ),
]


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]], description: str) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + j), "datasource": DS, "expr": expr, "legendFormat": legend}
            for j, (legend, expr) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "lstm-serve",
        "title": "lstm-serve",
        "tags": ["lstm-serve"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
