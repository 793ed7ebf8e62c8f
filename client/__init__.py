"""Clients of a running LocCa server, apart from the server: nothing here imports the server's code, so a
client loads no model, no FastAPI and no engine (tests/test_layers.py checks it).

    from client import LoccaClient
    with LoccaClient("http://127.0.0.1:8000") as c:
        print(c.caption(Image.open("scene.png")).caption)

sdk.py: the REST (sync and async) and gRPC clients; remote_eval.py: `locca eval --url`, the held-out
evaluation through a server's REST API. The gRPC stubs come from service/protos.py, which generates them
from proto/locca/v1/locca.proto and imports nothing of the server.
"""

from .sdk import (
    AsyncLoccaClient,
    Caption,
    LoccaClient,
    LoccaError,
    LoccaGrpcClient,
    Phrase,
    Referral,
    Region,
    image_bytes,
)

__all__ = ["AsyncLoccaClient", "Caption", "LoccaClient", "LoccaError", "LoccaGrpcClient", "Phrase", "Referral",
           "Region", "image_bytes"]
