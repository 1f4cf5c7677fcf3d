"""The line the mirror logs when it starts: what it serves, from where, and to whom."""

from __future__ import annotations

from .config import Config


def startup(config: Config, where: str) -> str:
    """The startup line: where it listens (http:// or https://), where the data is, the
    upstreams, offline mode, and who must log in to pull and to push."""
    server, access = config.server, config.access
    scheme = "https" if server.tls_certificate else "http"
    host = f"[{server.host}]" if ":" in server.host else server.host
    parts = [f"serving {scheme}://{host}:{server.port} with data in {where}"]
    if config.upstreams:
        parts.append("upstreams: " + ", ".join(
            f"{u.name}={u.url}{' (default)' if u.default else ''}" for u in config.upstreams))
    else:
        parts.append("no upstreams (hosted repositories only)")
    if server.offline:
        parts.append("offline: no upstream is contacted (server.offline)")
    parts.append(_logins(access))
    return "; ".join(parts)


def _logins(access) -> str:
    if access.htpasswd is None:
        pull = "pull: no login"
        if access.read_only:
            push = "push: refused (access.read_only)"
        elif access.anonymous_push:
            push = "push: no login, from anywhere (access.anonymous_push)"
        else:
            push = "push: no login, from this host only"
        return f"{pull}, {push}"
    pull = "pull: no login" if access.anonymous_pull else "pull: login required"
    if access.read_only:
        push = "push: refused (access.read_only)"
    elif access.push_users:
        push = f"push: login required, as {', '.join(access.push_users)}"
    else:
        push = "push: login required"
    return f"logins from {access.htpasswd}: {pull}, {push}"
