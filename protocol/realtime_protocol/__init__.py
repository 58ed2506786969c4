"""The Realtime wire protocol: frames, both codecs and error codes (docs/PROTOCOL.md).

Pure and sans-I/O, shared by the server (``realtime``) and the Python client
(``realtime-client``), so that both read and write the same bytes. Its only dependency is
``orjson``.
"""
