"""What the mirror is doing, for people and for machines: the status page at `/`, its
JSON twin `/status.json`, the Prometheus metrics at `/metrics`, and the probes `/healthz`
(alive) and `/readyz` (storage writable and index open).

The page is plain HTML with inline CSS, server-drawn SVG charts (api/charts.py) and a meta
refresh, no JavaScript; every value that comes from outside (repository names, upstream
errors, digests) goes through html.escape. `/status.json` carries every panel's data as
one document (docs/status.md). None of these paths has a `/v2/` in it, so none can collide
with the registry's routes.

Who may read them: `reader(request)` is the rule, and every status handler (the cache view
too) calls it first. It is the registry API's read rule (api/access.py): without logins,
anyone; with logins and `anonymous_pull = true`, anyone, read-only; with `anonymous_pull =
false`, a login, else 401 with the usual challenge. Nothing shown is a secret: no password,
token, htpasswd hash, upstream credential or cluster secret, and upstream URLs lose any
`user:password@`.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from html import escape
from pathlib import Path

from aiohttp import web
from yarl import URL

from .. import metrics
from ..errors import Unauthorized
from ..keys import ACCESS, CONFIG, POLICY, PROXY, REPLICAS, SCANNER, SIGNATURES
from ..trust.rules import PullPolicy
from ..trust.scanner import Scanner
from ..trust.signatures import Signatures
from . import panels

READY_TIMEOUT = 2.0  # a hung disk makes /readyz fail, never hang


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when a file can be created in <root>/tmp and the index answers a read; else 503
    naming what failed. The checks run on a thread: a stuck disk must not stop the loop.

    With several replicas the shared stores (Redis, the object store) are checked too, but
    their failure is "degraded", still 200: every replica shares them, so taking replicas
    out of the load balancer would turn a partial outage (blobs by digest, stale tags still
    served) into a whole one."""
    proxy = request.app[PROXY]
    loop = asyncio.get_running_loop()
    shared = proxy.store.remote is not None
    checks = {"storage": lambda: loop.run_in_executor(None, _writable, proxy.store.tmp)}
    degradable = {}
    (degradable if shared else checks)["index"] = proxy.index.metadata.check
    if shared:
        degradable["object_store"] = proxy.store.remote.check
    failed, degraded = await _run_checks(checks), await _run_checks(degradable)
    if failed:
        return _json({"status": "unready", "failed": {**failed, **degraded}}, status=503)
    if degraded:
        return _json({"status": "degraded", "degraded": degraded})
    return _json({"status": "ok"})


async def _run_checks(checks: dict) -> dict[str, str]:
    failed = {}
    for name, check in checks.items():
        try:
            await asyncio.wait_for(check(), READY_TIMEOUT)
        except TimeoutError:
            failed[name] = f"no answer within {READY_TIMEOUT:g}s"
        except Exception as e:  # whatever it is, the mirror cannot serve
            failed[name] = f"{e.__class__.__name__}: {getattr(e, 'message', e)}"
    return failed


def _writable(directory: Path) -> None:
    fd, name = tempfile.mkstemp(prefix="readyz-", dir=directory)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(name)


async def metrics_text(request: web.Request) -> web.Response:
    return web.Response(body=request.app[metrics.METRICS].exposition(),
                        headers={"Content-Type": metrics.CONTENT_TYPE})


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(document).encode(),
                        headers={"Content-Type": "application/json"})


async def reader(request: web.Request) -> str | None:
    """The read rule of every status path: the user logged in (None when anonymous), or
    Unauthorized when logins are configured and `anonymous_pull = false` and none was given.
    The access middleware applies the same rule before any handler; asking again here keeps
    each status handler safe on its own (and tells it who is looking)."""
    access = request.app[ACCESS]
    user = await access.user(request)
    if access.users is not None and user is None and not access.config.anonymous_pull:
        raise Unauthorized("log in to see this mirror's status")
    return user


# The page.
async def page(request: web.Request) -> web.Response:
    await reader(request)
    cluster = request.app.get(REPLICAS)
    replicas = (cluster.name, await cluster.alive()) if cluster is not None else None
    range_ = request.query.get("range", "hour")
    body = render(request.app, request.host, replicas,
                  range_=range_ if range_ in panels.RANGES else "hour")
    return web.Response(body=body.encode(), headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})


async def status_json(request: web.Request) -> web.Response:
    """Every panel's data, for scripts (docs/status.md)."""
    await reader(request)
    cluster = request.app.get(REPLICAS)
    document = data(request.app)
    if cluster is not None:
        document["cluster"] = {"replica": cluster.name, "alive": [
            {"name": e.get("name"), "seen": e.get("seen")} for e in await cluster.alive()]}
    response = _json(document)
    response.headers["Cache-Control"] = "no-store"
    return response


def data(app: web.Application) -> dict:
    """The page's panels as one JSON document."""
    config, proxy = app[CONFIG], app[PROXY]
    app_metrics = app[metrics.METRICS]
    used, budget = app_metrics.disk.read()
    now_monotonic = time.monotonic()
    upstreams = [{
        "name": u.name, "url": public_url(u.base),
        "rate_limited_for": max(u.paused_until - now_monotonic, 0.0),
        "last_ok": u.last_ok, "last_error": u.last_error,
        **{key: metrics.value(series, upstream=u.name) for key, series in (
            ("requests", app_metrics.upstream_requests),
            ("errors", app_metrics.upstream_errors),
            ("rate_limited", app_metrics.upstream_rate_limited),
            ("fetched_bytes", app_metrics.upstream_bytes))},
    } for u in proxy.upstreams.values()]
    return {
        "generated": time.time(),
        "uptime_seconds": time.time() - app_metrics.started,
        "disk": {"used_bytes": used, "budget_bytes": budget or config.storage.max_size or None,
                 "evictions": metrics.total(app_metrics.evictions),
                 "evicted_bytes": metrics.total(app_metrics.evicted_bytes)},
        "cache": {"hit_ratio": hit_ratio(app_metrics),
                  "hits": metrics.total(app_metrics.cache_hits),
                  "misses": metrics.total(app_metrics.cache_misses),
                  "coalesced": metrics.total(app_metrics.coalesced),
                  "served_bytes": metrics.total(app_metrics.cache_bytes),
                  "fetched_bytes": metrics.total(app_metrics.upstream_bytes)},
        "requests": dict(_by_route(app_metrics)),
        "trends": panels.trends_data(app),
        "upstreams": upstreams,
        **panels.denials_data(app),
        "fills": [{"digest": f.digest, "written": f.written, "size": f.size,
                   "from": _source(f), "readers": getattr(f, "readers", 0)}
                  for f in list(proxy.fills.active.values())],
        "repositories": [{"name": name, "requests": n}
                         for name, n in app_metrics.repositories.top(10)],
    }


def public_url(url: URL) -> str:
    """An upstream's URL as shown: never with the `user:password@` it may be written with."""
    return str(url.with_user(None)) if url.user or url.password else str(url)


def hit_ratio(app_metrics: metrics.Metrics) -> float | None:
    """Manifest and blob requests answered from the cache, of all of them."""
    hits, misses = metrics.total(app_metrics.cache_hits), metrics.total(app_metrics.cache_misses)
    return hits / (hits + misses) if hits + misses else None


def percent(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio * 100:.1f}%"


def render(app: web.Application, host: str,
           replicas: tuple[str, list[dict]] | None = None, range_: str = "hour") -> str:
    config, proxy = app[CONFIG], app[PROXY]
    app_metrics = app[metrics.METRICS]
    used, budget = app_metrics.disk.read()
    budget = budget or config.storage.max_size
    served = metrics.total(app_metrics.cache_bytes)
    fetched = metrics.total(app_metrics.upstream_bytes)
    hits, misses = metrics.total(app_metrics.cache_hits), metrics.total(app_metrics.cache_misses)
    evicted = metrics.total(app_metrics.evictions), metrics.total(app_metrics.evicted_bytes)
    cards = [
        _card("Disk", [
            ("used", "not reported" if used is None else _bytes(used)),
            ("budget", "no limit" if not budget else _bytes(budget)),
            ("evicted", f"{_count(evicted[0])} ({_bytes(evicted[1])})"),
        ], bar=used / budget if used is not None and budget else None),
        _card("Cache", [
            ("hit ratio", percent(hit_ratio(app_metrics))),
            ("hits / misses", f"{_count(hits)} / {_count(misses)}"),
            ("joined a running fetch", _count(metrics.total(app_metrics.coalesced))),
            ("bytes saved (served from cache)", _bytes(served)),
            ("fetched upstream", _bytes(fetched)),
        ], bar=hit_ratio(app_metrics)),
        _card("Requests", [(route, _count(n)) for route, n in _by_route(app_metrics)] or
              [("none yet", "")]),
    ]
    if replicas is not None:
        cards.append(_cluster(app_metrics, *replicas))
    return PAGE.format(
        title=escape(f"mirror · {host}"),
        uptime=escape(_duration(time.time() - app_metrics.started)),
        cards="\n".join(cards),
        range=escape(panels.RANGES[range_]),
        trends=panels.trends_html(app, range_, time.time(), _bytes),
        denials=panels.denials_html(app, _clock, _table),
        upstreams=_upstreams(app_metrics, proxy),
        policy=_policy(app[POLICY], app_metrics) + _signatures(app[SIGNATURES], app_metrics)
        + _scanner(app[SCANNER], app_metrics),
        fills=_fills(proxy),
        repositories=_repositories(app_metrics),
        generated=escape(time.strftime("%Y-%m-%d %H:%M:%S %Z")),
    )


def _by_route(app_metrics: metrics.Metrics) -> list[tuple[str, float]]:
    totals = metrics.by_label(app_metrics.requests, "route")
    return sorted(totals.items(), key=lambda item: -item[1])


def _card(title: str, rows: list[tuple[str, str]], bar: float | None = None) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    meter = "" if bar is None else \
        f'<div class="bar"><span style="width:{min(max(bar, 0), 1) * 100:.1f}%"></span></div>'
    return f'<section class="card"><h2>{escape(title)}</h2>{meter}<dl>{items}</dl></section>'


def _upstreams(app_metrics: metrics.Metrics, proxy) -> str:
    now_monotonic, now = time.monotonic(), time.time()
    rows = []
    for upstream in proxy.upstreams.values():
        name = upstream.name
        if upstream.paused_until > now_monotonic:
            wait = upstream.paused_until - now_monotonic
            health, css = f"rate limited, waiting {wait:.0f}s", "warn"
        elif upstream.last_error is not None:
            health, css = "failing", "bad"
        elif upstream.last_ok is not None:
            health, css = "ok", "good"
        else:
            health, css = "not asked yet", "idle"
        last_ok = "never" if upstream.last_ok is None else \
            _duration(now - upstream.last_ok) + " ago"
        asked, failed, limited, fetched = (
            metrics.value(series, upstream=name) for series in (
                app_metrics.upstream_requests, app_metrics.upstream_errors,
                app_metrics.upstream_rate_limited, app_metrics.upstream_bytes))
        rows.append(
            f"<tr><td><b>{escape(name)}</b><br>"
            f"<small>{escape(public_url(upstream.base))}</small></td>"
            f'<td><span class="pill {css}">{escape(health)}</span></td>'
            f"<td>{escape(last_ok)}</td>"
            f"<td>{escape(upstream.last_error or '—')}</td>"
            f'<td class="n">{_count(asked)}</td><td class="n">{_count(failed)}</td>'
            f'<td class="n">{_count(limited)}</td>'
            f'<td class="n">{escape(_bytes(fetched))}</td></tr>')
    return _table(("upstream", "health", "last success", "last error", "requests", "errors",
                   "429s", "fetched"), rows, "No upstreams are configured.")


def _policy(policy: PullPolicy, app_metrics: metrics.Metrics) -> str:
    """The pull rules with their counts (their denials are in the denials panel)."""
    decisions = {(s.labels["rule"], s.labels["decision"]): s.value
                 for family in app_metrics.policy_decisions.collect() for s in family.samples
                 if s.name.endswith("_total")}
    rules = [f"<tr><td><code>{escape(rule.where)}</code></td><td>{escape(rule.describe())}</td>"
             f'<td class="n">{_count(decisions.get((rule.label, "allowed"), 0))}</td>'
             f'<td class="n">{_count(decisions.get((rule.label, "denied"), 0))}</td></tr>'
             for rule in policy.rules.rules]
    if not rules:
        return '<p class="empty">No pull rules: every image may be pulled ' \
               "([[policy.rules]] in the config, docs/trust.md).</p>"
    return _table(("rule", "applies to", "allowed", "denied"), rules, "")


def _scanner(scanner: Scanner, app_metrics: metrics.Metrics) -> str:
    """The scanner gate's line: its counts by verdict."""
    if not scanner.active:
        return ""
    counts = {s.labels["verdict"]: s.value for family in app_metrics.scan_verdicts.collect()
              for s in family.samples if s.name.endswith("_total")}
    line = (f"<p><b>Scanner gate</b>: {_count(scanner.running)} scans pending "
            f"({_count(scanner.waiting)} requests waiting); requests "
            + ", ".join(f"{_count(counts.get(v, 0))} {v}"
                        for v in ("allowed", "denied", "pending", "error"))
            + f"; {_count(len(scanner.verdicts))} verdicts kept "
            f"(policy.scan_webhook, docs/trust.md).</p>")
    return line


def _signatures(signatures: Signatures, app_metrics: metrics.Metrics) -> str:
    """The signature rules with their verdict counts."""
    if not signatures.active:
        return ""
    counts = {(s.labels["rule"], s.labels["verdict"]): s.value
              for family in app_metrics.signature_verdicts.collect() for s in family.samples
              if s.name.endswith("_total")}
    rules = [f"<tr><td><code>{escape(rule.where)}</code></td><td>{escape(rule.describe())}</td>"
             + "".join(f'<td class="n">{_count(counts.get((rule.label, verdict), 0))}</td>'
                       for verdict in ("signed", "unsigned", "invalid")) + "</tr>"
             for rule in signatures.rules]
    return ("<h3>Signatures</h3>"
            + _table(("rule", "checks", "signed", "unsigned", "invalid"), rules, ""))


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _fills(proxy) -> str:
    rows = []
    for fill in list(proxy.fills.active.values()):
        size = fill.size
        done = fill.written / size if size else None
        progress = f"{_bytes(fill.written)} / {_bytes(size) if size is not None else '?'}"
        bar = "" if done is None else \
            f'<div class="bar"><span style="width:{min(done, 1) * 100:.1f}%"></span></div>'
        rows.append(
            f'<tr><td><code title="{escape(fill.digest)}">{escape(_short(fill.digest))}</code></td>'
            f'<td><span class="nowrap">{escape(progress)}</span>{bar}</td>'
            f'<td>{escape(_source(fill))}</td>'
            f'<td class="n">{getattr(fill, "readers", 0)}</td></tr>')
    return _table(("digest", "written / size", "from", "readers"), rows,
                  "No blob is being fetched.")


def _source(fill) -> str:
    """Where a fill reads now: an upstream route, another replica, the object store."""
    source = next((s for s in fill.sources if s.error is None), None)
    return source.route if source is not None else "—"


def _cluster(app_metrics: metrics.Metrics, me: str, replicas: list[dict]) -> str:
    """The replicas that beat lately, and this one's part in the cluster's fills."""
    now = time.time()
    rows = [(f"{entry.get('name', '?')}{' (this one)' if entry.get('name') == me else ''}",
             f"seen {_duration(max(now - float(entry.get('seen', now)), 0))} ago, sending "
             f"{len(entry.get('holds', []))} blob(s)") for entry in replicas]
    fills = metrics.by_label(app_metrics.cluster_fills, "role")
    rows += [
        ("fills held / followed / alone", f"{_count(fills.get('holder', 0))} / "
         f"{_count(fills.get('follower', 0))} / {_count(fills.get('alone', 0))}"),
        ("streamed to other replicas", _count(metrics.total(app_metrics.peer_streams))),
        ("taken over", _count(metrics.total(app_metrics.cluster_takeovers))),
        ("lease failures (Redis)", _count(metrics.total(app_metrics.cluster_lease_failures))),
    ]
    return _card(f"Cluster: {len(replicas)} replica(s)", rows or [("no heartbeat", "")])


def _repositories(app_metrics: metrics.Metrics) -> str:
    rows = [f'<tr><td>{escape(name)}</td><td class="n">{_count(n)}</td></tr>'
            for name, n in app_metrics.repositories.top(10)]
    return _table(("repository", "requests"), rows, "No pulls yet.")


def _table(headings: tuple[str, ...], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _short(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}…"


def _count(n: float) -> str:
    return f"{int(n):,}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="10">
<title>{title}</title>
<style>
:root {{ --ink:#1d2733; --muted:#5b6b7c; --line:#d9e1ea; --bg:#f3f6f9; --card:#fff;
        --accent:#2f6fde; --good:#1f8a4c; --warn:#b86e00; --bad:#c4302b; }}
* {{ box-sizing:border-box; }}
body {{ margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--ink); background:var(--bg); }}
header {{ background:#17324d; color:#fff; padding:14px 20px; }}
header h1 {{ margin:0; font-size:20px; }}
header p {{ margin:2px 0 0; color:#b9cbe0; font-size:13px; }}
main {{ padding:16px; max-width:1200px; margin:0 auto; }}
.grid {{ display:grid; gap:14px; grid-template-columns:repeat(auto-fit,minmax(260px,1fr));
         margin-bottom:14px; }}
.card {{ background:var(--card); border:1px solid var(--line); border-radius:8px;
        padding:12px 14px; margin-bottom:14px; }}
.grid .card {{ margin-bottom:0; }}
h3 {{ font-size:14px; margin:12px 0 6px; color:var(--muted); }}
h2 {{ font-size:15px; margin:0 0 8px; color:var(--accent); text-transform:uppercase;
     letter-spacing:.04em; }}
dl {{ display:grid; grid-template-columns:1fr auto; gap:4px 12px; margin:0; }}
dt {{ color:var(--muted); }} dd {{ margin:0; font-weight:600; text-align:right; }}
.bar {{ height:8px; background:#e3e9f0; border-radius:4px; overflow:hidden; margin:4px 0 10px; }}
.bar span {{ display:block; height:100%; background:var(--accent); }}
.scroll {{ overflow-x:auto; }}
table {{ border-collapse:collapse; width:100%; font-size:14px; }}
th, td {{ text-align:left; padding:6px 8px; border-bottom:1px solid var(--line);
         vertical-align:top; }}
th {{ color:var(--muted); font-weight:600; white-space:nowrap; }}
td.n {{ text-align:right; font-variant-numeric:tabular-nums; }}
td small {{ color:var(--muted); }}
code {{ font-size:13px; }}
.pill {{ display:inline-block; padding:1px 8px; border-radius:10px; color:#fff;
        font-size:13px; white-space:nowrap; }}
.good {{ background:var(--good); }} .warn {{ background:var(--warn); }}
.bad {{ background:var(--bad); }} .idle {{ background:#8a97a6; }}
.empty {{ color:var(--muted); margin:0; }} .nowrap {{ white-space:nowrap; }}
footer {{ color:var(--muted); font-size:12px; text-align:center; padding:8px 0 20px; }}
.charts {{ display:grid; gap:10px 16px; grid-template-columns:repeat(auto-fit,minmax(230px,1fr)); }}
.chart {{ margin:0; }} .chart svg {{ display:block; width:100%; height:auto;
         background:#f8fafc; border:1px solid var(--line); border-radius:4px; }}
.chart figcaption {{ font-size:13px; color:var(--muted); font-weight:600; }}
.chart p {{ margin:2px 0 0; font-size:12px; color:var(--muted); }}
.chart .key {{ margin-right:8px; white-space:nowrap; }}
.chart .key i {{ display:inline-block; width:10px; height:3px; margin:0 4px 3px 0; }}
.chart .axis {{ font-size:9px; fill:var(--muted); }}
.chart .grid {{ stroke:var(--line); stroke-width:1; }}
</style></head>
<body>
<header><h1>{title}</h1><p>pull-through registry mirror · up {uptime} ·
<a href="/cache" style="color:#b9cbe0">browse the cache</a></p></header>
<main>
<div class="grid">
{cards}
</div>
<section class="card" id="trends"><h2>Trends, {range}</h2>{trends}</section>
<section class="card"><h2>Upstreams</h2>{upstreams}</section>
<section class="card" id="denials"><h2>Denials and failures</h2>{denials}</section>
<section class="card"><h2>Policy</h2>{policy}</section>
<section class="card"><h2>Fills in progress</h2>{fills}</section>
<section class="card"><h2>Busiest repositories</h2>{repositories}
<p class="empty"><small>by manifest requests since the start</small></p></section>
</main>
<footer>generated {generated} · refreshes every 10 s ·
<a href="/status.json">status.json</a> · <a href="/metrics">metrics</a> ·
<a href="/readyz">readyz</a></footer>
</body></html>
"""
