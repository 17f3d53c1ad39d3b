"""`sam-jax demo`: a click-to-segment page, served from this machine.

The stack (the `demo` extra): Starlette for the ASGI app and uvicorn to serve it, two small
pure-Python packages, and pycocotools for the COCO RLE download. The page is one static HTML file
with plain JavaScript drawing on a canvas: no framework and no asset fetched from the internet,
so the demo works offline and installs in seconds. Gradio, the usual choice for model demos, was
set aside: it ships its own front-end bundle and pulls in dozens of packages (FastAPI, pandas,
matplotlib, ...) for a page that needs a canvas and a few buttons, and its event model would sit
between a click and the decoder's tens of milliseconds.

- `server.create_app(model, params)`: the Starlette app (testable in-process with Starlette's
  TestClient); its endpoints, limits and payloads are described there.
- `serving`: the listening socket and the uvicorn server that `sam-jax demo` runs the app on.
- `prompts`: the checks of what the page sends; `encoding`: uploaded bytes -> pixels, masks -> PNG.
"""

from .server import create_app

__all__ = ["create_app"]
