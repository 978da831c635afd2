"""Large JSON request bodies are decoded in a helper process, not under the server's GIL.

`json.loads` of a many-megabyte body (worse with \\u escapes) holds the GIL for up to a
few hundred milliseconds on a loaded CPU, and a worker thread does not help: the event
loop cannot run meanwhile. So bodies above `OFFLOAD_BYTES` go to one long-lived helper
interpreter (`python -I -S`, standard library only) that decodes them and sends the
result back pickled; what comes back holds only what JSON can express (dicts, lists,
strings, numbers, booleans, None), produced by our own program, and unpickling it is a
copy. Decoding errors come back as the same `json.JSONDecodeError` (or ValueError) that
`json.loads` would raise. If the helper cannot be used, decoding falls back to this
process, so a request is never lost to the optimisation.
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any

logger = logging.getLogger("thinkwise.server")

OFFLOAD_BYTES = 256 << 10

_HELPER = r"""
import json, pickle, struct, sys
read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
while True:
    head = read(8)
    if len(head) < 8:
        break
    body = read(struct.unpack("!Q", head)[0])
    try:
        status, out = 0, pickle.dumps(json.loads(body), protocol=pickle.HIGHEST_PROTOCOL)
    except json.JSONDecodeError as error:
        status, out = 1, pickle.dumps((error.msg, error.pos))
    except (ValueError, RecursionError, MemoryError) as error:
        status, out = 2, pickle.dumps(str(error))
    write(bytes([status]) + struct.pack("!Q", len(out)) + out)
    sys.stdout.buffer.flush()
"""


class JSONBodyDecoder:
    """Blocking `decode(body)`; call it from a worker thread (the I/O releases the GIL)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def decode(self, body: bytes) -> Any:
        if len(body) <= OFFLOAD_BYTES:
            return json.loads(body)
        with self._lock:
            try:
                status, payload = self._exchange(body)
            except (OSError, ValueError, struct.error) as error:
                logger.warning("JSON helper process failed (%s); decoding in the server process", error)
                self._stop()
                return json.loads(body)
        if status == 0:
            return pickle.loads(payload)
        if status == 1:
            message, position = pickle.loads(payload)
            raise json.JSONDecodeError(message, body.decode("utf-8", "replace"), position)
        raise ValueError(pickle.loads(payload))

    def _exchange(self, body: bytes) -> tuple[int, bytes]:
        process = self._process
        if process is None or process.poll() is not None:
            process = self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env={})
        process.stdin.write(struct.pack("!Q", len(body)))
        process.stdin.write(body)
        process.stdin.flush()
        head = process.stdout.read(9)
        if len(head) < 9:
            raise OSError("the helper closed its pipe")
        length = struct.unpack("!Q", head[1:])[0]
        payload = process.stdout.read(length)
        if len(payload) < length:
            raise OSError("the helper's answer was cut short")
        return head[0], payload

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._stop()
