"""A STAND-IN for Grafana, for the compose test on machines where the Grafana image cannot be pulled (no registry) and
no Debian package brings Grafana. It is not Grafana and renders nothing.

What it does is what the compose test needs from Grafana, read from the same mounted files in the same places:
- reads the provisioning directory (GF_PATHS_PROVISIONING, default /etc/grafana/provisioning): every datasource of
  datasources/*.yml (name, uid, type, url) and every dashboard provider of dashboards/*.yml, whose `options.path` it
  loads the *.json dashboards from; a file it cannot read or a provider path without dashboards stops the start;
- answers, on GF_SERVER_HTTP_ADDR:GF_SERVER_HTTP_PORT (default 0.0.0.0:3000), this subset of Grafana's HTTP API:
  GET /api/health, /api/search, /api/dashboards/uid/UID and /api/datasources/proxy/uid/UID/PATH (the request passed
  on to the datasource's url, as Grafana's proxy access does).
So the test's requests are Grafana's own, and run unchanged against a real Grafana.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import yaml

VERSION = "stand-in (tests/deploy/standins/grafana), not Grafana"


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*") if p.suffix in (".yml", ".yaml"))


def load(provisioning: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The provisioned datasources and dashboards, both by uid."""
    datasources: dict[str, dict[str, Any]] = {}
    for path in _yaml_files(provisioning / "datasources"):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            datasources[source["uid"]] = source
    dashboards: dict[str, dict[str, Any]] = {}
    for path in _yaml_files(provisioning / "dashboards"):
        for provider in yaml.safe_load(path.read_text()).get("providers", []):
            found = sorted(Path(provider["options"]["path"]).glob("*.json"))
            if not found:
                raise SystemExit(
                    f"{path}: provider {provider['name']!r}: no dashboards in {provider['options']['path']}"
                )
            for board in found:
                dashboard = json.loads(board.read_text())
                dashboards[dashboard["uid"]] = dashboard
    if not datasources or not dashboards:
        raise SystemExit(
            f"{provisioning}: nothing provisioned (datasources {list(datasources)}, dashboards {list(dashboards)})"
        )
    return datasources, dashboards


class Handler(BaseHTTPRequestHandler):
    datasources: ClassVar[dict[str, dict[str, Any]]] = {}
    dashboards: ClassVar[dict[str, dict[str, Any]]] = {}

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        self._answer(status, json.dumps(value).encode())

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if url.path == "/api/health":
            self._json({"database": "ok", "version": VERSION})
        elif url.path == "/api/search":
            self._json([{"uid": uid, "title": d["title"], "type": "dash-db"} for uid, d in self.dashboards.items()])
        elif parts[:3] == ["api", "dashboards", "uid"] and len(parts) == 4 and parts[3] in self.dashboards:
            self._json({"dashboard": self.dashboards[parts[3]], "meta": {"provisioned": True}})
        elif parts[:4] == ["api", "datasources", "proxy", "uid"] and len(parts) > 5 and parts[4] in self.datasources:
            target = self.datasources[parts[4]]["url"].rstrip("/") + "/" + "/".join(parts[5:])
            if url.query:
                target += "?" + url.query
            try:
                with urllib.request.urlopen(target, timeout=10) as reply:
                    self._answer(reply.status, reply.read(), reply.headers.get("Content-Type", "text/plain"))
            except urllib.error.HTTPError as exc:
                self._answer(exc.code, exc.read())
            except OSError as exc:
                self._json({"message": f"datasource unreachable: {exc}"}, 502)
        else:
            self._json({"message": "not found (the stand-in answers only a few Grafana API paths)"}, 404)


def main() -> None:
    provisioning = Path(os.environ.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"))
    Handler.datasources, Handler.dashboards = load(provisioning)
    address = (os.environ.get("GF_SERVER_HTTP_ADDR") or "0.0.0.0", int(os.environ.get("GF_SERVER_HTTP_PORT", "3000")))
    server = ThreadingHTTPServer(address, Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 in its container: no default action
    print(f"{VERSION}: dashboards {list(Handler.dashboards)} on {address[0]}:{address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
