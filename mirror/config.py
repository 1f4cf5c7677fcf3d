"""The configuration: one typed tree of frozen dataclasses, loaded as defaults < TOML < env.

`load(path, environ)` reads an optional TOML file and then applies `MIRROR_*` environment
variables: `MIRROR_<SECTION>_<KEY>` for `[server]`, `[storage]`, `[limits]`, `[hosted]` and `[access]`, and
`MIRROR_UPSTREAM_<NAME>_<KEY>` for the upstream called NAME (upper-cased, every character
that is not a letter or digit written as `_`: `MIRROR_UPSTREAM_DOCKER_IO_PASSWORD`).
Every unknown key and every bad value is a `ConfigError` that names the key, because a
typo in a mirror's config otherwise shows up weeks later as a silent upstream miss.
`[[policy.rules]]` (an array of tables, like `[[upstreams]]`) has no environment form; its
globs and platforms are checked by mirror/trust/rules.py, which names the rule.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A config key is unknown or its value is unusable; the message names the key."""


@dataclass(frozen=True)
class Server:
    listen: str = "0.0.0.0:5000"
    access_log: bool = True
    # HTTPS when both are set (PEM files); clients then need no "insecure registry" setting.
    tls_certificate: str | None = None
    tls_key: str | None = None
    # Never contact an upstream: serve what the cache holds (an air-gapped site fed by bundles).
    offline: bool = False
    # "text": one readable line per event; "json": one JSON object per line, with a request id.
    log_format: str = "text"

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True)
class Storage:
    root: str = "./data"
    # A byte budget for cached content ("200GiB"); unset: no limit. Above high_watermark of
    # it, least-recently-used cached content is evicted down to low_watermark. Hosted
    # repositories and pinned images are never evicted (but count towards the use).
    max_size: int | None = None
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    # Content used more recently than this is never evicted (a client may be opening it).
    keep_recent: float = 10.0
    # "filesystem": blobs are files under root. "s3": blobs are objects in [storage.s3]
    # (the durable copy, shared by every replica), root holds only the local hot tier and
    # spools; this needs [cluster] redis for the metadata the replicas share.
    backend: str = "filesystem"
    # With "s3": the bytes of hot blobs each replica keeps on its own disk, served by
    # sendfile ("20GiB"); unset: none, every blob GET reads from the object store.
    local_cache_size: int | None = None
    s3: "S3" = field(default_factory=lambda: S3())


@dataclass(frozen=True)
class S3:
    """[storage.s3]: an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, GCS, SeaweedFS)."""

    # The service's URL ("http://minio:9000"); unset: AWS S3 in `region`.
    endpoint: str | None = None
    bucket: str = "mirror"
    region: str = "us-east-1"
    # Every key starts with this ("prod/"), so several mirrors can share a bucket.
    prefix: str = ""
    # Unset: botocore's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile,
    # an instance role). Or MIRROR_STORAGE_S3_ACCESS_KEY / MIRROR_STORAGE_S3_SECRET_KEY.
    access_key: str | None = None
    secret_key: str | None = None
    # Answer blob GETs with a 307 to a presigned URL of the object (as Distribution does):
    # clients then fetch from the object store and replicas carry no blob bytes.
    redirect: bool = False
    # How long such a URL is valid.
    redirect_ttl: float = 300.0


@dataclass(frozen=True)
class Cluster:
    # Several replicas share their metadata (tags, manifests, hosted repositories, upload
    # sessions, the usage ledger) in this Redis ("redis://:password@redis:6379/0"); it
    # must persist (appendonly yes). Unset: one node, metadata in SQLite under storage.root.
    redis: str | None = None
    # Every Redis key starts with "<name>:", so several clusters can share a Redis.
    name: str = "mirror"
    # This replica's name in the cluster (its status, its hold on blobs being read);
    # unset: the host name and the listening port.
    replica: str | None = None
    # The URL other replicas reach this one at, to stream a blob it is fetching from the
    # upstream ("http://10.0.3.7:5000"); unset: http://<host name>:<port>.
    advertise: str | None = None
    # Shared by the replicas: signs their requests to each other's internal endpoint
    # (/_mirror/fills/). Unset: replicas do not stream from each other, and each fetches a
    # new blob itself (one upstream fetch per replica, not per cluster).
    secret: str | None = None


@dataclass(frozen=True)
class Hosted:
    # Push-to-create, as registry:2 does: a push to any name makes a hosted repository,
    # which from then on wins over the upstreams for that name.
    enabled: bool = True
    # Names that may be hosted, by prefix ("team/" allows team/app); empty: any name.
    prefixes: tuple[str, ...] = ()
    # DELETE of hosted manifests, tags and blobs.
    delete: bool = True
    # Unfinished uploads older than this are removed.
    upload_ttl: float = 86400.0
    # One upload may hold at most this many bytes (413 past it); uploads in progress count
    # towards storage.max_size like everything else on the disk.
    max_upload_size: int | None = 10 << 30
    # Uploads in progress at once per client address (429 past it).
    max_uploads_per_client: int = 32


@dataclass(frozen=True)
class Access:
    # An htpasswd file (bcrypt entries; `mirror user add NAME` writes it). Unset: no logins,
    # anyone may pull and push (as a plain registry:2).
    htpasswd: str | None = None
    # With an htpasswd file: whether pulling needs no login.
    anonymous_pull: bool = True
    # With an htpasswd file: who may push and delete; empty means every user in the file.
    push_users: tuple[str, ...] = ()
    # Refuse every push and delete (pull-through caching goes on).
    read_only: bool = False
    # Without an htpasswd file: whether clients on other hosts may push and delete without a
    # login. Off by default, so a mirror listening on 0.0.0.0 takes pushes from loopback
    # only until logins are configured (or this is set, which logs a warning at start).
    anonymous_push: bool = False
    # Failed logins per client address per minute before the next ones get 429.
    login_failures_per_minute: int = 10


@dataclass(frozen=True)
class Limits:
    # In-flight upstream requests over all upstreams, and per upstream; the rest queues.
    upstream_requests: int = 64
    upstream_requests_per_upstream: int = 16
    # An upstream body that makes no progress for this long is aborted (a watchdog, not a
    # wall-clock limit: a slow but moving 5 GB layer is never cut).
    stall_timeout: float = 30.0
    connect_timeout: float = 10.0
    # Manifests, tag checks and token requests are small: they get a whole-request limit.
    request_timeout: float = 30.0
    # A request waiting longer than this for an upstream slot is answered 503 with
    # Retry-After instead of hanging (a hanging mirror is the harmful kind).
    slot_timeout: float = 10.0
    # Blob bodies streaming from upstreams at once, over all upstreams; a slot covers only
    # connecting and the response headers, so manifests never wait behind layers.
    upstream_bodies: int = 64
    # Ranges in one multi-range request; with more, the whole blob is sent (200), never 416.
    max_ranges: int = 16
    # Client connections: the longest request line and header field, and how long a client
    # may take to send its headers or keep an idle connection open.
    max_line_size: int = 8190
    max_field_size: int = 8190
    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    default: bool = False
    aliases: tuple[str, ...] = ()
    tag_ttl: float = 300.0
    # Docker Hub keeps official images under library/; None means "yes for docker.io".
    library: bool | None = None
    # Token realms on other hosts that may receive the credentials ("auth.docker.io", or
    # "host:port"). Without this, credentials go only to the url's own scheme, host and
    # port; Docker Hub's url gets ("auth.docker.io",) unless the key is set.
    realm_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Here and not only in load(): a Config built in code must not carry a secret into
        # the startup line or the status page either.
        try:
            parts = urlsplit(self.url) if isinstance(self.url, str) else None
        except ValueError:
            parts = None  # unparsable: _check says so, naming the key
        if parts is not None and (parts.username is not None or parts.password is not None):
            raise ConfigError(
                f"upstream {self.name}: url must not contain credentials (user:password@); "
                f"set username and password (or password_file, or the environment variable "
                f"MIRROR_UPSTREAM_{_env_name(self.name)}_PASSWORD) instead")

    @property
    def adds_library(self) -> bool:
        return self.name == "docker.io" if self.library is None else self.library

    @property
    def prefixes(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def secret(self) -> str | None:
        if self.password is not None:
            return self.password
        if self.password_file:
            with open(self.password_file, encoding="utf-8") as f:
                return f.read().strip()
        return None


@dataclass(frozen=True)
class PolicyRule:
    """One `[[policy.rules]]` table; docs/trust.md says how rules combine."""

    # An upstream's name (or alias), or "hosted" for pulls of pushed repositories; unset:
    # every upstream (not hosted repositories).
    upstream: str | None = None
    # Repository globs, optionally with a ":tag" glob; empty: every repository.
    allow: tuple[str, ...] = ()
    # The same globs; a match denies, whatever allow says.
    deny: tuple[str, ...] = ()
    # "os/architecture[/variant]"; empty: any platform.
    platforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicySignature:
    """One `[[policy.signatures]]` table; docs/trust.md "Signatures" says what it checks."""

    # An upstream's name (or alias); unset: every upstream. Pushed repositories have none.
    upstream: str | None = None
    # Repository globs as in [[policy.rules]], without tags; empty: every repository.
    repositories: tuple[str, ...] = ()
    # PEM public keys (cosign.pub): `key` is one, `keys` several; a signature by any admits.
    key: str | None = None
    keys: tuple[str, ...] = ()
    # Keyless signers, (identity, issuer) pairs from `{identity = ..., issuer = ...}` tables;
    # they need policy.trusted_root.
    identities: tuple[tuple[str, str], ...] = ()
    mode: str = "enforce"  # enforce | warn | audit


@dataclass(frozen=True)
class Policy:
    rules: tuple[PolicyRule, ...] = ()
    signatures: tuple[PolicySignature, ...] = ()
    # Sigstore's trusted_root.json, for keyless signatures (identities) only.
    trusted_root: str | None = None
    # The scanner gate (trust/scanner.py): the URL a manifest digest is POSTed to before it
    # is first served; unset: no gate.
    scan_webhook: str | None = None
    # How long a client's request waits for a verdict before it gets 503 with Retry-After.
    scan_timeout: float = 30.0
    # Webhook unreachable, non-2xx or a bad answer: deny (503, so clients retry) or serve.
    scan_fail_closed: bool = True
    # Repository globs (as in [[policy.rules]], without tags) the gate applies to; empty: all.
    scan_repositories: tuple[str, ...] = ()


DEFAULT_UPSTREAMS = (
    Upstream("docker.io", "https://registry-1.docker.io", default=True,
             aliases=("hub", "index.docker.io", "registry-1.docker.io"),
             realm_hosts=("auth.docker.io",)),
    Upstream("quay.io", "https://quay.io"),
    Upstream("ghcr.io", "https://ghcr.io"),
    Upstream("registry.k8s.io", "https://registry.k8s.io", aliases=("k8s.gcr.io",)),
    Upstream("gcr.io", "https://gcr.io"),
)


@dataclass(frozen=True)
class Config:
    server: Server = field(default_factory=Server)
    storage: Storage = field(default_factory=Storage)
    limits: Limits = field(default_factory=Limits)
    hosted: Hosted = field(default_factory=Hosted)
    access: Access = field(default_factory=Access)
    cluster: Cluster = field(default_factory=Cluster)
    upstreams: tuple[Upstream, ...] = DEFAULT_UPSTREAMS
    policy: Policy = field(default_factory=Policy)

    @property
    def default_upstream(self) -> Upstream | None:
        return next((u for u in self.upstreams if u.default), None)


# Docker Hub's registry hands out tokens from another host: its realm_hosts default, so a
# docker.io table written by hand still logs in where it should.
KNOWN_REALM_HOSTS = {"registry-1.docker.io": ("auth.docker.io",),
                     "index.docker.io": ("auth.docker.io",)}
# Keys whose values are never repeated in an error message.
SECRET_KEYS = {"username", "password", "password_file", "secret_key", "redis", "secret"}
REALM_HOST = re.compile(r"(?:[a-z0-9]+(?:[.-][a-z0-9]+)*|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")

# An upstream name is a registry host (optionally with a port): it is the `ns=` value
# containerd sends and, without a port, a path prefix.
UPSTREAM_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?")
DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


SECTIONS = {"server": Server, "storage": Storage, "limits": Limits, "hosted": Hosted,
            "access": Access, "cluster": Cluster}
# Tables inside a section: [storage.s3], set from the environment as MIRROR_STORAGE_S3_*.
SUBSECTIONS = {("storage", "s3"): S3}


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the config from the embedded defaults, the TOML file at `path`, then `environ`."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    unknown = set(data) - set(SECTIONS) - {"upstreams", "policy"}
    if unknown:
        raise ConfigError(f"unknown config section: {sorted(unknown)[0]}")

    sections = {}
    for name, cls in SECTIONS.items():
        values = _table(data.get(name, {}), name)
        for (section, sub), sub_cls in SUBSECTIONS.items():
            if section == name:
                where = f"{name}.{sub}"
                sub_values = _table(values.pop(sub, {}), where)
                sub_values.update(_env_section(environ, f"{name}_{sub}", sub_cls))
                values[sub] = _build(sub_cls, sub_values, where)
        values.update(_env_section(environ, name, cls))
        sections[name] = _build(cls, values, name)

    raw_upstreams = data.get("upstreams")
    if raw_upstreams is None:
        upstreams = [{k: v for k, v in dataclasses.asdict(u).items() if v is not None}
                     for u in DEFAULT_UPSTREAMS]
    elif isinstance(raw_upstreams, list):
        upstreams = [_table(u, f"upstreams[{i}]") for i, u in enumerate(raw_upstreams)]
    else:
        raise ConfigError("upstreams must be an array of tables ([[upstreams]])")
    built = []
    for i, values in enumerate(upstreams):
        where = f"upstreams[{i}]"
        if not isinstance(values.get("name"), str):
            raise ConfigError(f"{where}.name is required")
        values.update(_env_upstream(environ, values["name"]))
        if "realm_hosts" not in values and isinstance(values.get("url"), str):
            try:
                host = urlsplit(values["url"]).hostname or ""
            except ValueError:  # _check names the key
                host = ""
            values["realm_hosts"] = KNOWN_REALM_HOSTS.get(host, ())
        built.append(_build(Upstream, values, where))
    config = Config(upstreams=tuple(built), policy=_policy(data.get("policy", {})), **sections)
    _check_environment(environ, config)
    _check(config)
    return config


def _policy(value: Any) -> Policy:
    """[policy] with its `[[policy.rules]]`; what the globs mean is trust/rules.py's."""
    values = _table(value, "policy")
    scan = _scan_keys(values)
    for key in values:
        if key not in ("rules", "signatures", "trusted_root") and key not in scan:
            raise ConfigError(f"unknown config key: policy.{key}")
    raw = values.get("rules", [])
    if not isinstance(raw, list):
        raise ConfigError("policy.rules must be an array of tables ([[policy.rules]])")
    trusted_root = values.get("trusted_root")
    if trusted_root is not None and not isinstance(trusted_root, str):
        raise ConfigError("policy.trusted_root must be a string (a path to trusted_root.json)")
    return Policy(tuple(_build(PolicyRule, _table(rule, f"policy.rules[{i}]"),
                               f"policy.rules[{i}]") for i, rule in enumerate(raw)),
                  signatures=_signatures(values.get("signatures", [])),
                  trusted_root=trusted_root, **scan)


def _scan_keys(values: dict[str, Any]) -> dict[str, Any]:
    """The scanner gate's `scan_*` keys of [policy], converted and checked."""
    types = {f.name: f.type for f in dataclasses.fields(Policy) if f.name.startswith("scan_")}
    scan = {key: _convert(value, types[key], f"policy.{key}")
            for key, value in values.items() if key in types}
    webhook = scan.get("scan_webhook")
    if webhook is not None and not _url_of(webhook, ("http", "https")):
        raise ConfigError("policy.scan_webhook must be an http:// or https:// URL, not "
                          f"{_without_userinfo(webhook)!r}")
    from .trust.scanner import repository_globs  # here: trust/ imports this module's types

    repository_globs(scan.get("scan_repositories", ()), "policy.scan_repositories")
    return scan


def _signatures(raw: Any) -> tuple[PolicySignature, ...]:
    """[[policy.signatures]]; keys, globs and modes are checked by trust/signatures.py."""
    if not isinstance(raw, list):
        raise ConfigError("policy.signatures must be an array of tables "
                          "([[policy.signatures]])")
    built = []
    for i, table in enumerate(raw):
        where = f"policy.signatures[{i}]"
        values = dict(_table(table, where))
        identities = values.pop("identities", [])
        if not isinstance(identities, list):
            raise ConfigError(f"{where}.identities must be a list of "
                              "{identity = \"...\", issuer = \"...\"} tables")
        pairs = []
        for j, entry in enumerate(identities):
            entry = _table(entry, f"{where}.identities[{j}]")
            for key in entry:
                if key not in ("identity", "issuer"):
                    raise ConfigError(f"unknown config key: {where}.identities[{j}].{key}")
            for key in ("identity", "issuer"):
                if not isinstance(entry.get(key), str) or not entry[key]:
                    raise ConfigError(f"{where}.identities[{j}].{key} is required (a string)")
            pairs.append((entry["identity"], entry["issuer"]))
        built.append(dataclasses.replace(_build(PolicySignature, values, where),
                                         identities=tuple(pairs)))
    return tuple(built)


def _check_environment(environ: Mapping[str, str], config: Config) -> None:
    """A MIRROR_* variable that configures nothing is a typo worth stopping for."""
    known = ["MIRROR_CONFIG"] + [f"MIRROR_{s.upper()}_" for s in SECTIONS] + [
        "MIRROR_UPSTREAM_" + re.sub(r"[^A-Za-z0-9]", "_", u.name).upper() + "_"
        for u in config.upstreams]
    for var in environ:
        if var.startswith("MIRROR_") and not any(var.startswith(k) for k in known):
            raise ConfigError(f"environment variable {var} matches no config section or "
                              "configured upstream")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return dict(value)


def _env_section(environ: Mapping[str, str], section: str, cls: type) -> dict[str, str]:
    return _env_keys(environ, f"MIRROR_{section.upper()}_", cls)


def _env_name(name: str) -> str:
    """An upstream's name as its environment variables spell it: docker.io -> DOCKER_IO."""
    return re.sub(r"[^A-Za-z0-9]", "_", str(name)).upper()


def _env_upstream(environ: Mapping[str, str], name: str) -> dict[str, str]:
    prefix = "MIRROR_UPSTREAM_" + _env_name(name) + "_"
    return _env_keys(environ, prefix, Upstream, exclude="name")


def _env_keys(environ: Mapping[str, str], prefix: str, cls: type,
              exclude: str = "") -> dict[str, str]:
    """The fields of `cls` set by variables named prefix + FIELD; any other is an error
    (but a subsection's own: MIRROR_STORAGE_S3_* are [storage.s3]'s, not storage's)."""
    tables = {sub for (_, sub) in SUBSECTIONS if sub in _field_names(cls)}
    keys = {f.name.upper(): f.name for f in dataclasses.fields(cls)
            if f.name != exclude and f.name not in tables}
    nested = tuple(f"{prefix}{sub.upper()}_" for sub in tables)
    found = {}
    for var, value in environ.items():
        if var.startswith(prefix) and not var.startswith(nested):
            key = var[len(prefix):]
            if key not in keys:
                raise ConfigError(f"unknown config key in environment variable {var}")
            found[keys[key]] = value
    return found


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name} is required")
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key: {where}.{key}")
        kwargs[key] = _convert(value, fields[key].type, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    except ConfigError as e:  # from a __post_init__ check: say where it is
        raise ConfigError(f"{where}: {e}") from None


def _convert(value: Any, type_: str, key: str) -> Any:
    """Coerce a TOML value or an environment string to the field's declared type."""
    if key.rpartition(".")[2] in SECRET_KEYS and not isinstance(value, str):
        # The value may be the secret itself, mistyped (a numeric password unquoted).
        raise ConfigError(f"{key} must be a string (in quotes); its value is not shown")
    if type_ == "bool" or type_ == "bool | None":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if type_ == "int":
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a whole number, not {value!r}") from None
        if number < 1 or isinstance(value, bool):
            raise ConfigError(f"{key} must be at least 1, not {value!r}")
        return number
    if type_ == "float":
        if key.endswith("watermark"):
            return _fraction(value, key)
        return _duration(value, key)
    if type_ == "int | None":
        return _size(value, key)
    if dataclasses.is_dataclass(value):  # a subsection, built already
        return value
    if type_ == "tuple[str, ...]":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r}")
    return value


SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]i?B|B)?\s*", re.IGNORECASE)
SIZE_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}


def _size(value: Any, key: str) -> int:
    """Bytes as a number, or a string like "200GiB", "500 MB", "1.5TiB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := SIZE.fullmatch(value)):
        unit = m.group(2).lower() if m.group(2) else None
        try:
            size = int(float(m.group(1)) * SIZE_UNITS[unit])
        except OverflowError:  # so many digits that the float is infinite
            raise ConfigError(f"{key} is too large") from None
    else:
        raise ConfigError(f"{key} must be a size like \"200GiB\" or a number of bytes")
    if size < 1:
        raise ConfigError(f"{key} must be at least 1 byte")
    return size


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            raise ConfigError(f"{key} must be a fraction like 0.9 or \"90%\"") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ConfigError(f"{key} must be a fraction between 0 and 1, like 0.9 or \"90%\"")
    return float(value)


def _duration(value: Any, key: str) -> float:
    """Seconds as a number, or a string like "90s", "5m", "1h", "250ms"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key} must be a duration like 300, \"90s\", \"5m\" or \"1h\"")
    if seconds < 0:
        raise ConfigError(f"{key} must not be negative")
    return seconds


def _check(config: Config) -> None:
    server = config.server
    host, _, port = server.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"server.listen must be HOST:PORT, not {server.listen!r}")
    if (server.tls_certificate is None) != (server.tls_key is None):
        raise ConfigError("server.tls_certificate and server.tls_key must be set together")
    if config.cluster.redis and config.access.htpasswd and not config.cluster.secret:
        # Each replica would sign client tokens with a key of its own, and a token from one
        # would be refused by the next the load balancer picks, mid-pull.
        raise ConfigError("with access.htpasswd, several replicas need cluster.secret: client "
                          "tokens are signed with it, so each replica accepts the others'")
    for key in ("tls_certificate", "tls_key"):
        path = getattr(server, key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"server.{key}: no such file {path!r}")
    if config.server.log_format not in ("text", "json"):
        raise ConfigError(f"server.log_format must be \"text\" or \"json\", not "
                          f"{config.server.log_format!r}")
    if config.storage.low_watermark >= config.storage.high_watermark:
        raise ConfigError("storage.low_watermark must be below storage.high_watermark")
    if not config.storage.root:
        raise ConfigError("storage.root must not be empty")
    _check_cluster(config)
    seen: dict[str, str] = {}
    for i, up in enumerate(config.upstreams):
        where = f"upstreams[{i}]"
        for prefix in up.prefixes:
            if not UPSTREAM_NAME.fullmatch(prefix):
                raise ConfigError(
                    f"{where}: {prefix!r} is not a registry host name (lower case, like quay.io)")
            if prefix in seen:
                raise ConfigError(f"{where}: {prefix!r} is already used by upstream {seen[prefix]}")
            seen[prefix] = up.name
        try:
            parts = urlsplit(up.url)
            hostname, _ = parts.hostname, parts.port
        except ValueError:  # an unclosed [ in an IPv6 host, a port past 65535
            parts, hostname = None, None
        if parts is None or parts.scheme not in ("http", "https") or not hostname:
            raise ConfigError(f"{where}.url must be an http:// or https:// URL, "
                              f"not {_without_userinfo(up.url)!r}")
        for entry in up.realm_hosts:
            if not REALM_HOST.fullmatch(entry):
                raise ConfigError(f"{where}.realm_hosts: {entry!r} is not a host name or "
                                  "host:port (lower case, no scheme, like auth.docker.io)")
        if up.password is not None and up.password_file is not None:
            raise ConfigError(f"{where}: set password or password_file, not both")
    if sum(u.default for u in config.upstreams) > 1:
        raise ConfigError("only one upstream may have default = true")
    from .trust.rules import Rules  # here: trust/ imports this module's types

    Rules(config)  # every glob, upstream and platform of [[policy.rules]], by rule
    from .trust.signatures import compile_rules

    compile_rules(config)  # [[policy.signatures]]: globs, upstreams, modes (files: at serve)


def _check_cluster(config: Config) -> None:
    storage, cluster = config.storage, config.cluster
    if storage.backend not in ("filesystem", "s3"):
        raise ConfigError(f"storage.backend must be \"filesystem\" or \"s3\", not "
                          f"{storage.backend!r}")
    if storage.backend == "s3" and cluster.redis is None:
        raise ConfigError("storage.backend = \"s3\" needs cluster.redis: replicas that share a "
                          "bucket must share its metadata (tags, manifests, the usage ledger) "
                          "too; set cluster.redis = \"redis://host:6379/0\"")
    if cluster.redis is not None and storage.backend != "s3":
        raise ConfigError("cluster.redis needs storage.backend = \"s3\": replicas share blobs "
                          "through an object store, not a local disk; set [storage.s3]")
    if cluster.redis is not None and not _url_of(cluster.redis, ("redis", "rediss")):
        raise ConfigError("cluster.redis must be a redis:// or rediss:// URL "
                          "(its value is not shown: it may hold a password)")
    for key, url in (("storage.s3.endpoint", storage.s3.endpoint),
                     ("cluster.advertise", cluster.advertise)):
        if url is not None and not _url_of(url, ("http", "https")):
            raise ConfigError(f"{key} must be an http:// or https:// URL, not "
                              f"{_without_userinfo(url)!r}")
    if not storage.s3.bucket:
        raise ConfigError("storage.s3.bucket must not be empty")
    if cluster.secret is not None and len(cluster.secret) < 16:
        raise ConfigError("cluster.secret must be at least 16 characters (its value is not "
                          "shown); `openssl rand -hex 32` makes a good one")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", cluster.name):
        raise ConfigError(f"cluster.name must be letters, digits, - and _, not {cluster.name!r}")


def _url_of(url: str, schemes: tuple[str, ...]) -> bool:
    """Whether `url` parses, with one of `schemes`, a host, and a port that fits."""
    try:
        parts = urlsplit(url)
        parts.port  # raises for a port past 65535
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname)


def _without_userinfo(url: str) -> str:
    """`url` with anything before an @ in its authority cut out, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
