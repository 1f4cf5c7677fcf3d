"""The typed keys under which the application holds its long-lived parts."""

from aiohttp import web

from .budget import Budget
from .config import Config
from .hosted import Hosted
from .proxy import Proxy
from .reference import Router
from .uploads import Uploads

CONFIG = web.AppKey("config", Config)
ROUTER = web.AppKey("router", Router)
PROXY = web.AppKey("proxy", Proxy)
HOSTED = web.AppKey("hosted", Hosted)
UPLOADS = web.AppKey("uploads", Uploads)
BUDGET = web.AppKey("budget", Budget)
