"""The server's library side: the durable job store (``store.py``), the HTTP app and its thread (``app.py``), the
worker loop every rank runs (``worker.py``) and the web page (``static/index.html``). The entry point is
``launch/serve.py``."""
