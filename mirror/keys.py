"""The typed keys under which the application holds its long-lived parts."""

from aiohttp import web

from .api.access import Access
from .cache.budget import Budget
from .cache.hosted import Hosted
from .cache.proxy import Proxy
from .cluster.replicas import Replicas
from .config import Config
from .ops.trends import Trends
from .reference import Router
from .storage.uploads import Uploads
from .trust.rules import PullPolicy
from .trust.scanner import Scanner
from .trust.signatures import Signatures

CONFIG = web.AppKey("config", Config)
ACCESS = web.AppKey("access", Access)
ROUTER = web.AppKey("router", Router)
PROXY = web.AppKey("proxy", Proxy)
HOSTED = web.AppKey("hosted", Hosted)
UPLOADS = web.AppKey("uploads", Uploads)
BUDGET = web.AppKey("budget", Budget)
REPLICAS = web.AppKey("replicas", Replicas)  # only with several replicas (cluster.redis)
POLICY = web.AppKey("policy", PullPolicy)  # [[policy.rules]] (trust/rules.py)
SCANNER = web.AppKey("scanner", Scanner)  # policy.scan_webhook (trust/scanner.py)
SIGNATURES = web.AppKey("signatures", Signatures)  # [[policy.signatures]] (trust/signatures.py)
TRENDS = web.AppKey("trends", Trends)  # the status page's sampled trends (ops/trends.py)
