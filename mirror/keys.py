"""The typed keys under which the application holds its long-lived parts."""

from aiohttp import web

from .config import Config
from .proxy import Proxy
from .reference import Router

CONFIG = web.AppKey("config", Config)
ROUTER = web.AppKey("router", Router)
PROXY = web.AppKey("proxy", Proxy)
