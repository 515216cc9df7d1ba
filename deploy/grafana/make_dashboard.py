"""Writes deploy/grafana/dashboards/lstm-serve.json. The panels and their PromQL live here, readable; the JSON is
what Grafana provisions. Run after editing: python deploy/grafana/make_dashboard.py (a test checks it is current)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "lstm-serve.json"
R = "$__rate_interval"
DS = {"type": "prometheus", "uid": "prometheus"}

# (title, unit, [(legend, expr)], description)
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "Steps per second",
        "ops",
        [("{{model}}", f"sum by (model) (rate(lstm_steps_total[{R}]))")],
        "Time steps computed for sessions (a request of T steps counts T).",
    ),
    (
        "RPCs per second",
        "reqps",
        [("{{method}}", f"sum by (method) (rate(lstm_rpcs_total[{R}]))")],
        "Finished RPCs by method; a StreamSteps stream counts once when it ends.",
    ),
    (
        "RPC latency p50",
        "s",
        [("{{method}}", f"histogram_quantile(0.5, sum by (le, method) (rate(lstm_rpc_duration_seconds_bucket[{R}])))")],
        "Median time from receiving a call to its reply.",
    ),
    (
        "RPC latency p99",
        "s",
        [
            (
                "{{method}}",
                f"histogram_quantile(0.99, sum by (le, method) (rate(lstm_rpc_duration_seconds_bucket[{R}])))",
            )
        ],
        "99th percentile; the alert LstmServeStepLatencyHigh watches Step's.",
    ),
    (
        "Errors by status code",
        "reqps",
        [
            ("{{code}} (RPC)", f'sum by (code) (rate(lstm_rpcs_total{{code!="OK"}}[{R}]))'),
            ("{{code}} (in stream)", f'sum by (code) (rate(lstm_stream_requests_total{{code!="OK"}}[{R}]))'),
        ],
        "Failed RPCs and in-band StreamSteps errors. NOT_FOUND / FAILED_PRECONDITION are usually client-side.",
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
        "Batch size",
        "short",
        [
            (
                "mean {{model}}",
                f"sum by (model) (rate(lstm_batch_size_sum[{R}])) / sum by (model) (rate(lstm_batch_size_count[{R}]))",
            ),
            ("p90 {{model}}", f"histogram_quantile(0.9, sum by (le, model) (rate(lstm_batch_size_bucket[{R}])))"),
        ],
        "Sessions per batched backend call. Near 1 under load means little batching.",
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
        ],
        "Models served and models that failed to load (ListModels says why).",
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
