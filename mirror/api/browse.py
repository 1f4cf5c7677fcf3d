"""The cache view: what the mirror holds, for people at `/cache` and for scripts at
`/cache.json`, one repository at `/cache/<name>` (and `/cache.json?name=<name>`).

Every repository, cached from an upstream or hosted, with its tags and digests, platforms,
sizes, last use, pins and the verdicts of the current rules, exactly as `mirror ls --json`
builds it (ops/inventory.py's `Inventory`, on the server's own metadata, index and blob
store). A page holds `PAGE` repositories in name order and reads only them: the page of
names comes from the metadata store's ordered keys, then that page's records and what they
reach. `?q=` keeps the names holding it (a plain GET form), `?from=` one upstream's
repositories or the hosted ones; the next page is `?last=<name>&kind=<kind>`, a cursor,
so the 1,000th page costs what the first does.

Plain HTML with inline CSS and no JavaScript; every value from outside (names, tags,
digests, media types, platforms, verdicts) goes through html.escape. Who may look is
status.reader's rule, as for the status page; nothing here is a secret (upstreams appear
by name only).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from html import escape
from urllib.parse import quote, urlencode

from aiohttp import web

from ..errors import NameUnknown, PaginationInvalid
from ..keys import CONFIG, POLICY, PROXY, SIGNATURES
from ..ops.inventory import PAGE, Cursor, Inventory, Page, Repository
from ..ops.local import human_size
from ..ops.verdicts import SignatureVerdicts
from ..storage.blobs import BlobStore
from ..storage.index import Index
from ..storage.metadata import Metadata
from . import status

MAX_PAGE = 500      # ?n= for scripts
MAX_QUERY = 256     # characters of ?q= and ?last= (no name is longer)
TAGS_SHOWN = 8      # tags in a row of the listing; the repository's own page has them all
KINDS = ("cached", "hosted")


@dataclass(frozen=True)
class Parts:
    """The running server's storage, as ops/inventory.py reads it."""

    metadata: Metadata
    index: Index
    store: BlobStore


def inventory(app: web.Application) -> Inventory:
    """An inventory of the server's storage under the rules it enforces now (signature
    keys are loaded per request only when there are signature rules)."""
    proxy, config = app[PROXY], app[CONFIG]
    parts = Parts(proxy.index.metadata, proxy.index, proxy.store)
    verdicts = SignatureVerdicts(config, parts) if app[SIGNATURES].active else None
    return Inventory(config, parts, app[POLICY].rules, verdicts)


@dataclass(frozen=True)
class Query:
    """What a request asks of the listing."""

    contains: str
    after: Cursor
    limit: int
    source: str | None = None  # ?from=: an upstream's name, or "hosted"

    @classmethod
    def of(cls, request: web.Request) -> Query:
        source = request.query.get("from") or None
        if source is not None and source not in sources(request.app):
            raise PaginationInvalid(f"from must be one of {', '.join(sources(request.app))}, "
                                    f"not {source[:50]!r}")
        q = request.query.get("q", "").strip().lower()
        last, kind = request.query.get("last", ""), request.query.get("kind", "hosted")
        n = request.query.get("n", str(PAGE))
        if kind not in KINDS:
            raise PaginationInvalid(f"kind must be cached or hosted, not {kind[:50]!r}")
        if not n.isdigit() or not 1 <= int(n) <= MAX_PAGE:
            raise PaginationInvalid(f"n must be a whole number from 1 to {MAX_PAGE}")
        if len(q) > MAX_QUERY or len(last) > MAX_QUERY:
            raise PaginationInvalid(f"q and last are at most {MAX_QUERY} characters")
        return cls(q, Cursor(last, kind), int(n), source)

    def link(self, path: str, after: Cursor | None = None) -> str:
        """`path` with this query's search and size, from `after` (None: the first page)."""
        query: dict[str, str | int] = {}
        if self.source:
            query["from"] = self.source
        if self.contains:
            query["q"] = self.contains
        if after is not None:
            query.update(last=after.name, kind=after.kind)
        if self.limit != PAGE:
            query["n"] = self.limit
        return path + ("?" + urlencode(query) if query else "")

    def where(self, source: str | None) -> Query:
        """The same search, from the first page, of another source."""
        return Query(self.contains, Cursor(), self.limit, source)


def sources(app: web.Application) -> list[str]:
    """What `?from=` may name: each upstream, and the hosted repositories."""
    return [u.name for u in app[CONFIG].upstreams] + ["hosted"]


async def listing(request: web.Request) -> web.Response:
    await status.reader(request)
    query = Query.of(request)
    page = await inventory(request.app).page(query.after, query.limit, query.contains,
                                             query.source)
    return _html(_listing_page(request.host, query, page, sources(request.app)))


async def listing_json(request: web.Request) -> web.Response:
    """The listing's page as `{"repositories": [...], "next": <url> | null}`, each
    repository as `ls --json` prints it; `?name=` gives that repository alone."""
    await status.reader(request)
    if "name" in request.query:
        found = await inventory(request.app).named(request.query["name"][:MAX_QUERY])
        if not found:
            raise NameUnknown(f"{request.query['name'][:200]!r} is not in the cache")
        return _json({"repositories": [r.as_json() for r in found]})
    query = Query.of(request)
    page = await inventory(request.app).page(query.after, query.limit, query.contains,
                                             query.source)
    return _json({"repositories": [r.as_json() for r in page.repositories],
                  "next": query.link("/cache.json", page.next) if page.next else None})


async def repository(request: web.Request) -> web.Response:
    """One repository's page: every tag and manifest (cached and hosted, if both)."""
    await status.reader(request)
    name = request.match_info["name"][:MAX_QUERY]
    found = await inventory(request.app).named(name)
    body = _repository_page(request.host, name, found)
    return _html(body, code=200 if found else 404)


def _html(body: str, code: int = 200) -> web.Response:
    return web.Response(status=code, body=body.encode(), headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})


def _json(document: object) -> web.Response:
    return web.Response(body=json.dumps(document).encode(), headers={
        "Content-Type": "application/json", "Cache-Control": "no-store"})


# The HTML.
def _listing_page(host: str, query: Query, page: Page, choices: list[str]) -> str:
    rows = [_row(r) for r in page.repositories]
    shown = [(None, "all"), *((c, c) for c in choices)]
    filters = '<p class="muted">from: ' + " · ".join(
        f"<b>{escape(label)}</b>" if source == query.source else
        f'<a href="{escape(query.where(source).link("/cache"))}">{escape(label)}</a>'
        for source, label in shown) + "</p>"
    searched = f" holding “{escape(query.contains)}”" if query.contains else ""
    start = "" if query.after == Cursor() else \
        f' · <a href="{escape(query.link("/cache"))}">first page</a>'
    following = "" if page.next is None else \
        f' · <a rel="next" href="{escape(query.link("/cache", page.next))}">next page ›</a>'
    here = query.after if query.after != Cursor() else None
    noun = "repository" if len(rows) == 1 else "repositories"
    summary = (f'<p class="muted">{len(rows)} {noun}{searched}'
               + (f" after <code>{escape(query.after.name)}</code>" if here else "")
               + f'{start}{following} · <a href="{escape(query.link("/cache.json", here))}">'
               "JSON</a></p>")
    table = _table(("repository", "from", "tags", "platforms", "size", "last use", "pins",
                    "verdict"), rows,
                   "Nothing matches." if query.contains else "Nothing is cached or hosted yet.")
    keep = "" if query.source is None else \
        f'<input type="hidden" name="from" value="{escape(query.source)}">'
    form = ('<form method="get" action="/cache"><input type="search" name="q" '
            f'value="{escape(query.contains)}" placeholder="repository name contains…" '
            f'aria-label="search by name">{keep} <button type="submit">Search</button></form>')
    return PAGE_HTML.format(title=escape(f"mirror · {host} · cache"),
                            body=form + filters + summary + table)


def _row(r: Repository) -> str:
    tags = sorted(r.tags)
    shown = " ".join(f"<code>{escape(t)}</code>" for t in tags[:TAGS_SHOWN])
    if len(tags) > TAGS_SHOWN:
        shown += f' <span class="muted">+{len(tags) - TAGS_SHOWN:,} more</span>'
    return (f'<tr><td><a href="{escape(_path(r.name))}">{escape(r.name)}</a></td>'
            f"<td>{_source(r)}</td><td>{shown or '<span class=muted>none</span>'}</td>"
            f"<td>{_platforms(r)}</td>"
            f'<td class="n">{escape(human_size(r.size))}</td>'
            f"<td>{_age(r.last_used)}</td><td>{_pins(r)}</td><td>{_verdict(r)}</td></tr>")


def _repository_page(host: str, name: str, found: list[Repository]) -> str:
    back = '<p><a href="/cache">← all repositories</a> · ' \
        f'<a href="{escape("/cache.json?" + urlencode({"name": name}))}">JSON</a></p>'
    if not found:
        body = back + f'<p class="empty">{escape(name)} is not in the cache.</p>'
    else:
        body = back + "".join(_section(r) for r in found)
    return PAGE_HTML.format(title=escape(f"mirror · {host} · {name}"), body=body)


def _section(r: Repository) -> str:
    facts = [("from", _source(r)), ("key", escape(r.key) if r.key else "—"),
             ("size", escape(human_size(r.size))), ("last use", _age(r.last_used)),
             ("pins", _pins(r)), ("verdict", _verdict(r)),
             ("signatures", escape(r.signature_column()))]
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    tagged: set[str] = set()
    rows = []
    for tag, classes in sorted(r.tags.items()):
        for accept_class, digest in sorted(classes.items()):
            tagged.add(digest)
            rows.append(f"<tr><td><code>{escape(tag)}</code></td><td>{escape(accept_class)}</td>"
                        + _manifest_cells(r, digest)
                        + f"<td>{escape(_tag_verdict(r, tag))}</td></tr>")
    tags = _table(("tag", "answers", "digest", "media type", "platforms", "size", "pinned",
                   "verdict"), rows, "No tags.")
    untagged = [f"<tr>{_manifest_cells(r, d)}</tr>" for d in sorted(r.manifests)
                if d not in tagged]
    others = "" if not untagged else "<h3>Untagged manifests</h3>" + _table(
        ("digest", "media type", "platforms", "size", "pinned"), untagged, "")
    return (f'<section class="card"><h2>{escape(r.name)} '
            f'<span class="pill idle">{escape(r.kind)}</span></h2><dl>{items}</dl>'
            f"<h3>Tags</h3>{tags}{others}</section>")


def _manifest_cells(r: Repository, digest: str) -> str:
    m = r.manifests.get(digest) or {}
    platforms = ", ".join(_platform(p) for p in m.get("platforms", [])) or "—"
    return (f'<td><code title="{escape(digest)}">{escape(_short(digest))}</code></td>'
            f"<td>{escape(m.get('media_type') or 'not stored')}</td><td>{platforms}</td>"
            f'<td class="n">{escape(human_size(m.get("size", 0)))}</td>'
            f"<td>{'pinned' if m.get('pinned') else '—'}</td>")


def _tag_verdict(r: Repository, tag: str) -> str:
    verdict = r.tag_verdicts.get(tag, "allowed")
    _, found = r.signatures.get(tag, ("", "not required"))
    signed = found if isinstance(found, str) else " + ".join(map(str, found))
    return verdict if signed == "not required" else f"{verdict}; {signed}"


def _source(r: Repository) -> str:
    return escape(r.upstream) if r.upstream else '<span class="pill good">hosted</span>'


def _platforms(r: Repository) -> str:
    stored: dict[str, bool] = {}
    for manifest in r.manifests.values():
        for p in manifest.get("platforms", []):
            stored[p["platform"]] = stored.get(p["platform"], False) or p["stored"]
    return ", ".join(escape(p) if here else f'<s title="not stored">{escape(p)}</s>'
                     for p, here in sorted(stored.items())) or "—"


def _platform(p: dict) -> str:
    name = escape(p.get("platform") or "?")
    return name if p.get("stored") else f'<s title="not stored">{name}</s>'


def _pins(r: Repository) -> str:
    if not r.pins:
        return "—"
    return f'<span class="pill warn" title="{escape(" ".join(r.pins))}">' \
        f"pinned ({len(r.pins)})</span>"


def _verdict(r: Repository) -> str:
    column = r.verdict_column()
    css = "good" if column == "allowed" else "bad" if r.verdict != "allowed" else "warn"
    return f'<span class="pill {css}">{escape(column)}</span>'


def _age(clock: float | None) -> str:
    if clock is None:
        return '<span class="muted">never</span>'
    seconds = max(time.time() - clock, 0)
    if seconds < 90:
        age = f"{seconds:.0f} s ago"
    elif seconds < 5400:
        age = f"{seconds / 60:.0f} min ago"
    elif seconds < 172800:
        age = f"{seconds / 3600:.1f} h ago"
    else:
        age = f"{seconds / 86400:.0f} days ago"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(clock))
    return f'<span title="{escape(when)}">{escape(age)}</span>'


def _path(name: str) -> str:
    return "/cache/" + quote(name, safe="/:")


def _short(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}…"


def _table(headings: tuple[str, ...], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
:root {{ --ink:#1d2733; --muted:#5b6b7c; --line:#d9e1ea; --bg:#f3f6f9; --card:#fff;
        --accent:#2f6fde; --good:#1f8a4c; --warn:#b86e00; --bad:#c4302b; }}
* {{ box-sizing:border-box; }}
body {{ margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--ink); background:var(--bg); }}
header {{ background:#17324d; color:#fff; padding:14px 20px; }}
header h1 {{ margin:0; font-size:20px; }} header a {{ color:#b9cbe0; }}
main {{ padding:16px; max-width:1300px; margin:0 auto; }}
.card {{ background:var(--card); border:1px solid var(--line); border-radius:8px;
        padding:12px 14px; margin-bottom:14px; }}
h2 {{ font-size:17px; margin:0 0 8px; }} h3 {{ font-size:14px; margin:12px 0 6px;
     color:var(--muted); }}
dl {{ display:grid; grid-template-columns:max-content 1fr; gap:4px 14px; margin:0; }}
dt {{ color:var(--muted); }} dd {{ margin:0; }}
form {{ margin:0 0 10px; }} input[type=search] {{ width:min(420px,70vw); padding:6px 8px;
      font:inherit; border:1px solid var(--line); border-radius:6px; }}
button {{ padding:6px 12px; font:inherit; border-radius:6px; border:1px solid var(--accent);
         background:var(--accent); color:#fff; }}
.scroll {{ overflow-x:auto; background:var(--card); border:1px solid var(--line);
          border-radius:8px; }}
table {{ border-collapse:collapse; width:100%; font-size:14px; }}
th, td {{ text-align:left; padding:6px 8px; border-bottom:1px solid var(--line);
         vertical-align:top; }}
th {{ color:var(--muted); font-weight:600; white-space:nowrap; }}
td.n {{ text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }}
code {{ font-size:13px; }} s {{ color:var(--muted); }}
.pill {{ display:inline-block; padding:1px 8px; border-radius:10px; color:#fff;
        font-size:13px; }}
.good {{ background:var(--good); }} .warn {{ background:var(--warn); }}
.bad {{ background:var(--bad); }} .idle {{ background:#8a97a6; }}
.muted, .empty {{ color:var(--muted); }}
</style></head>
<body>
<header><h1>{title}</h1><a href="/">status</a> · <a href="/cache">cache</a></header>
<main>
{body}
</main>
</body></html>
"""
