"""moto's S3 server with a request counter (benchmark only): ``python s3_counting.py PORT``.

Every request is counted by method and kind: ``image_put`` (a PUT of ``.../images/**.png|.json``:
the image's own two writes), else the top-level folder of the output root it touches (``images.png``, ``images.json``,
``loras``, ``runs``, ``catalog``, ...; ``list:<folder>`` for a LIST). ``GET /__counts__`` returns
the counts as JSON (not counted).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections import Counter
from urllib.parse import parse_qs

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

TRACE = open(os.environ["NIGHT_S3_TRACE"], "a", buffering=1) if os.environ.get("NIGHT_S3_TRACE") else None  # every request, in order
IMAGE_PUT = re.compile(r"/images/[^?]*\.(png|json)$")


def folder(path: str, query: str) -> str:
    """``/bucket/root/FOLDER/...`` -> FOLDER; a LIST (``/bucket?prefix=root/FOLDER/...``) -> ``list:FOLDER``."""
    parts = path.split("/")
    if len(parts) > 3:
        return parts[3] + (path[path.rfind("."):] if parts[3] == "images" and "." in parts[-1] else "")
    prefix = parse_qs(query).get("prefix", [""])[0].split("/")
    return "list:" + (prefix[1] if len(prefix) > 1 else prefix[0]) if "prefix" in query else (parts[2] if len(parts) > 2 else "")


class Counting:
    def __init__(self, app) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == "/__counts__":
            with self.lock:
                body = json.dumps(dict(self.counts)).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        kind = "image_put" if method == "PUT" and IMAGE_PUT.search(path) else folder(path, environ.get("QUERY_STRING", ""))
        with self.lock:
            self.counts[f"{method} {kind}"] += 1
            if TRACE:
                TRACE.write(f"{method} {path}?{environ.get('QUERY_STRING', '')}\n")
        return self.app(environ, start_response)


if __name__ == "__main__":
    run_simple("127.0.0.1", int(sys.argv[1]), Counting(DomainDispatcherApplication(create_backend_app)), threaded=True)
