"""A FastAPI service with the descriptor leak behind the classic "502/504 behind nginx" incident.

Every request reads an optional settings override through `read_settings`, which opens the file
with os.open and never closes it (LEAK=1, the default). The handler tolerates a failing read and
falls back to defaults, so the app's own logs stay quiet while its descriptor table fills; once
it is full, asyncio's accept() fails with EMFILE, connections wait in the listen backlog and
nginx gives up on the upstream. LEAK=0 selects the fixed version.

Two more endpoints stand for the other 504s behind nginx:
- /slow answers after SLOW_SECONDS (default 2): slower than a proxy_read_timeout of 1s, nginx
  gives up first ("upstream timed out ... while reading response header from upstream");
- /block sleeps BLOCK_SECONDS (default 1.5) inside the event loop (a blocking call in an async
  handler): nothing is accepted meanwhile, the listen backlog fills, the kernel drops the SYNs
  past it and nginx's connects time out ("... while connecting to upstream").

Run it with a low RLIMIT_NOFILE (serve.sh sets 64) behind nginx.conf.template; load.py drives it.
"""

import asyncio
import os
import time

from fastapi import FastAPI

SETTINGS = os.environ.get("SETTINGS_FILE", "/etc/hostname")
LEAK = os.environ.get("LEAK", "1") != "0"

app = FastAPI()


def read_settings(path: str) -> bytes:
    """Reads the settings override; the leaky version forgets to close the descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    data = os.read(fd, 4096)
    if not LEAK:
        os.close(fd)
    return data


@app.get("/")
async def index() -> dict:
    try:
        settings = read_settings(SETTINGS)
    except OSError:
        # Optional settings: defaults are fine. (This is what hides the leak from the app's logs.)
        settings = b""
    return {"ok": True, "settings_bytes": len(settings)}


@app.get("/slow")
async def slow() -> dict:
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "2")))
    return {"ok": True}


@app.get("/block")
async def block() -> dict:
    # The mistake on purpose: a blocking sleep in an async handler stalls the whole loop.
    time.sleep(float(os.environ.get("BLOCK_SECONDS", "1.5")))
    return {"ok": True}


@app.get("/healthz")
async def healthz() -> dict:
    return {"ok": True}
