"""The operators' status page, as HTML: pure functions from the documents the API serves (health,
performance, tenants, slow queries) to markup — no sockets, no assets from anywhere else.

Every value is escaped. Every figure sits in an element carrying ``data-k`` (its key), so a
test (and a curious operator) can tell which API figure each one shows. The page refreshes its
live part itself: a small inline script fetches ``/status/fragment`` every few seconds; the
inline script and style carry the response's CSP nonce.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["render_fragment", "render_page"]

REFRESH_MS = 3000

_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
  background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;
  align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
main{padding:12px 20px;display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));
  gap:14px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;
  overflow-x:auto}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px 3px 0;border-bottom:1px solid #eef0f3;
  white-space:nowrap;vertical-align:top}
th{font-weight:600;color:#555}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.sql{white-space:normal;font-family:ui-monospace,monospace;font-size:12px}
.kpis{display:flex;gap:18px;flex-wrap:wrap}
.kpi b{display:block;font-size:20px;font-variant-numeric:tabular-nums}
.kpi span{color:#666;font-size:12px}
.st{padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.st-healthy,.st-active,.st-registered,.st-ready,.st-running{background:#d9f2e1;color:#17652f}
.st-degraded,.st-suspended,.st-registering,.st-standby{background:#fdf0cf;color:#7a5600}
.st-unhealthy,.st-unreachable,.st-failed{background:#fadcdc;color:#8c1c1c}
.st-not_configured,.st-unknown{background:#eceef2;color:#555}
.muted{color:#777}
"""

_SCRIPT = (
    "setInterval(async () => { try {"
    ' const r = await fetch("/status/fragment", {credentials: "same-origin"});'
    ' if (r.ok) { document.getElementById("live").innerHTML = await r.text(); }'
    " } catch (e) {} }, " + str(REFRESH_MS) + ");"
)


def render_page(data: Mapping[str, Any], *, nonce: str) -> str:
    body = render_fragment(data, source="page")
    n = _e(nonce)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        "<title>Database Service — status</title>"
        f"<style nonce={n}>{_STYLE}</style></head>"
        f"<body><div id=live>{body}</div><script nonce={n}>{_SCRIPT}</script></body></html>"
    )


def render_fragment(data: Mapping[str, Any], *, source: str = "refresh") -> str:
    """The live part; ``source`` (page or refresh) is marked in it, so a test can tell that
    the page refreshed itself."""
    health = data["health"]
    perf = health.get("performance_metrics", {})
    parts = [
        f"<span hidden data-k=source>{_e(source)}</span>",
        _header(health),
        "<main>",
        _requests(perf, data["performance"]),
    ]
    parts.append(_dependencies(health.get("dependencies", {})))
    parts.append(_tenants(data["tenants"], data["performance"].get("pools", {}), data["slow"]))
    parts.append(_ingestion(health.get("dependencies", {})))
    parts.append(_replicas(health.get("replicas")))
    parts.append(_backups(health.get("backups", {})))
    parts.append(_hub(health.get("central_hub", {})))
    parts.append(_slow(data["slow_recent"]))
    parts.append("</main>")
    return "".join(parts)


# --- sections ---------------------------------------------------------------------------------


def _header(health: Mapping[str, Any]) -> str:
    workers = health.get("workers", {})
    return (
        "<header><h1>Database Service</h1>"
        f"<span>{_status(health.get('status'), 'status')}</span>"
        f"<span>version <b data-k=version>{_e(health.get('version'))}</b></span>"
        f"<span>up <b data-k=uptime_seconds>{_e(_round(health.get('uptime_seconds'), 0))}</b>"
        " s</span>"
        f"<span>workers <b data-k=workers>{_e(workers.get('count'))}</b></span>"
        f"<span class=muted>at <span data-k=timestamp>{_e(health.get('timestamp'))}</span>"
        "</span></header>"
    )


def _requests(perf: Mapping[str, Any], performance: Mapping[str, Any]) -> str:
    kpis = [
        ("throughput_rps", "requests/s (last minute)", perf.get("throughput_rps")),
        ("p50_ms", "p50 ms", perf.get("p50_ms")),
        ("p99_ms", "p99 ms", perf.get("p99_ms")),
        ("error_rate_percent", "errors %", perf.get("error_rate_percent")),
        ("requests_last_60s", "requests in 60 s", perf.get("requests_last_60s")),
        ("cache_hit_rate", "cache hit rate", perf.get("cache_hit_rate")),
        ("pool_connections_open", "pool connections", performance.get("pool_connections_open")),
    ]
    cells = "".join(
        f"<div class=kpi><b data-k={key}>{_e(_round(value, 3)) if value is not None else '—'}"
        f"</b><span>{_e(label)}</span></div>"
        for key, label, value in kpis
    )
    return f"<section class=wide><h2>Requests</h2><div class=kpis>{cells}</div></section>"


def _dependencies(dependencies: Mapping[str, Any]) -> str:
    rows = []
    for name, dep in dependencies.items():
        detail = dep.get("error") or dep.get("details") or dep.get("version") or ""
        if isinstance(detail, dict):
            detail = ", ".join(f"{k}={v}" for k, v in list(detail.items())[:4])
        rows.append(
            f"<tr data-dep={_e(name)}><td>{_e(name)}</td>"
            f"<td>{_status(dep.get('status'), 'dep-' + name)}</td>"
            f"<td class=muted>{_e(str(detail)[:120])}</td></tr>"
        )
    return _table("Dependencies", ("store", "status", ""), rows)


def _tenants(
    tenants: Iterable[Mapping[str, Any]],
    pools: Mapping[str, Mapping[str, Any]],
    slow: Mapping[str, int],
) -> str:
    rows = []
    for t in tenants:
        tid = t["tenant_id"]
        pool = pools.get(tid, {})
        rows.append(
            f"<tr data-tenant={_e(tid)}><td>{_e(tid)}</td>"
            f"<td>{_status(t.get('status'), 'tenant-status')}</td>"
            f"{_num(pool.get('size', 0), 'pool_size')}{_num(pool.get('in_use', 0), 'pool_in_use')}"
            f"{_num(pool.get('max', 0), 'pool_max')}{_num(slow.get(tid, 0), 'slow_last_hour')}"
            "</tr>"
        )
    head = ("tenant", "status", "pool open", "in use", "max", "slow (1 h)")
    return _table("Tenants", head, rows, wide=True, empty="no tenants")


def _ingestion(dependencies: Mapping[str, Any]) -> str:
    transports = dependencies.get("ingestion", {}).get("transports", {})
    rows = [
        f"<tr data-transport={_e(name)}><td>{_e(name)}</td>"
        f"<td>{_status(t.get('state'), 'ingest_state')}</td>"
        f"{_num(t.get('records_per_second'), 'ingest_rate')}{_num(t.get('lag'), 'ingest_lag')}"
        f"{_num(t.get('stored'), 'ingest_stored')}{_num(t.get('dead_letters'), 'dead_letters')}"
        "</tr>"
        for name, t in transports.items()
    ]
    return _table(
        "Ingestion", ("transport", "state", "records/s", "lag", "stored", "dead letters"), rows,
        empty="no transport configured",
    )  # fmt: skip


def _replicas(replicas: Mapping[str, Any] | None) -> str:
    if not replicas:
        return _table("Read replicas", ("replica", "state", "lag ms"), [], empty="none configured")
    rows = [
        f"<tr><td>{_e(r.get('name'))}</td><td>{_status(r.get('status'), 'replica')}</td>"
        f"{_num(r.get('lag_ms'), 'replica_lag_ms')}</tr>"
        for r in replicas.get("replicas", [])
    ]
    return _table("Read replicas", ("replica", "state", "lag ms"), rows)


def _backups(backups: Mapping[str, Any]) -> str:
    status = backups.get("status", "not_configured")
    facts = {k: v for k, v in backups.items() if k != "status" and not isinstance(v, dict | list)}
    rows = [f"<tr><td>state</td><td>{_status(status, 'backups')}</td></tr>"] + [
        f"<tr><td>{_e(k)}</td><td data-k=backup_{_e(k)}>{_e(v)}</td></tr>"
        for k, v in list(facts.items())[:8]
    ]
    return _table("Backups", ("", ""), rows)


def _hub(hub: Mapping[str, Any]) -> str:
    rows = [f"<tr><td>state</td><td>{_status(hub.get('status', 'unknown'), 'hub')}</td></tr>"]
    for key in ("url", "instance_id", "last_heartbeat", "consecutive_failures", "last_error"):
        if hub.get(key) is not None:
            rows.append(f"<tr><td>{key}</td><td data-k=hub_{key}>{_e(hub[key])}</td></tr>")
    return _table("Central Hub", ("", ""), rows)


def _slow(entries: Iterable[Mapping[str, Any]]) -> str:
    rows = [
        f"<tr><td>{_e(e['tenant_id'])}</td><td class=muted>{_e(e['recorded_at'])}</td>"
        f"{_num(_round(e['duration_ms'], 1), 'slow_ms')}"
        f"<td class=sql>{_e(str(e['statement'])[:200])}</td></tr>"
        for e in entries
    ]
    return _table(
        "Slow queries (newest)", ("tenant", "at", "ms", "statement"), rows, wide=True,
        empty="none recorded",
    )  # fmt: skip


# --- markup -------------------------------------------------------------------------------------


_NUMERIC = frozenset(
    {
        "pool open",
        "in use",
        "max",
        "slow (1 h)",
        "lag",
        "stored",
        "dead letters",
        "lag ms",
        "ms",
        "records/s",
    }
)


def _table(
    title: str, head: Iterable[str], rows: list[str], *, wide: bool = False, empty: str = ""
) -> str:
    cls = " class=wide" if wide else ""
    ths = "".join(
        f"<th class=num>{_e(h)}</th>" if h in _NUMERIC else f"<th>{_e(h)}</th>" for h in head
    )
    body = "".join(rows) or f"<tr><td class=muted colspan=8>{_e(empty)}</td></tr>"
    return f"<section{cls}><h2>{_e(title)}</h2><table><tr>{ths}</tr>{body}</table></section>"


def _status(value: Any, key: str) -> str:
    text = str(value if value is not None else "unknown")
    css = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    return f"<span class='st st-{css}' data-k={_e(key)}>{_e(text)}</span>"


def _num(value: Any, key: str) -> str:
    return f"<td class=num data-k={key}>{_e('' if value is None else value)}</td>"


def _round(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return round(value, digits) if digits else int(value)
    return value


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)
