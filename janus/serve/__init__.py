"""`janus serve`: the HTTP API and the Gradio demo on one FastAPI app, sharing one model worker.

Needs the `serve` extra: `pip install "janus-unified[serve]"`.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from ..pipeline import Janus
from .api import add_api
from .worker import ImageSettings, ModelWorker

__all__ = ["ImageSettings", "ModelWorker", "create_app", "serve_in_background"]


def create_app(
    model: Janus, model_name: str = "janus", api_only: bool = False, concurrency: int = 4, max_batch_images: int = 16
) -> FastAPI:
    """The API under /v1 and /health and, unless `api_only`, the demo at /. The worker is `app.state.worker`."""
    worker = ModelWorker(model, concurrency, max_batch_images)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="janus", lifespan=lifespan)
    app.state.worker = worker
    add_api(app, worker, model_name)
    if not api_only:
        from .app import mount_demo  # gradio takes seconds to import: only when the demo is served

        mount_demo(app, worker, concurrency)
    return app


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn on a thread (tests, notebooks); yields its base URL. Port 0: a free one."""
    sock = socket.socket()  # IPv4
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start; see its log above")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
