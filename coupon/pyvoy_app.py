"""The ASGI app as `server.engine: pyvoy` loads it: inside each Envoy process, at import.

pyvoy imports `module:attr` in the interpreter it embeds in Envoy and has no factory option, so
this module builds the app when imported, from the config file the parent named (the same
variable uvicorn's workers read), and sets up logging there, since that interpreter starts
with none. gRPC and gRPC-Web calls go through coupon.pyvoy_asgi on their way in and out.
"""

from __future__ import annotations

import logging.config
import os

from coupon.app import CONFIG_PATH_ENV, create_app, tune_garbage_collection
from coupon.config import load_config
from coupon.gen.coupon_connect import CouponService
from coupon.logs import logging_config
from coupon.pyvoy_asgi import adapt_streaming_protocols, unary_paths

_config = load_config(os.environ.get(CONFIG_PATH_ENV) or None)
logging.config.dictConfig(logging_config(_config.server.log_format, _config.server.log_level))
app = adapt_streaming_protocols(create_app(_config), unary_paths(CouponService.desc()))
tune_garbage_collection()
