"""The benchmark's server: a plain asyncio HTTP/1.1 sink, standard library only.

It is the same for every environment under test: ``run.py`` starts it once, in
its own process, with the base interpreter (no aiohttp involved), so the
client's CPU time is measured alone and no client release is favoured by a
server of its own version.

For each request it reads the head and the whole body (Content-Length or
chunked), discards the body, and only then answers
``HTTP/1.1 200 OK`` with ``Content-Length: 0``, keeping the connection open.
One listener speaks plain HTTP, one TLS (certificate and key from trustme,
made by ``run.py``). ``GET /__stats`` on either returns the accepted
connection and request counts as JSON, a cross-check of the client's count.

Prints one JSON line, ``{"http": port, "tls": port}``, then serves until it is
terminated or its standard input is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from typing import Dict, List, Optional

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_RESPONSE_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_MAX_HEAD = 64 * 1024

STATS: Dict[str, int] = {"http": 0, "tls": 0, "requests": 0, "bad": 0}


class Sink(asyncio.Protocol):
    """One connection: parse requests, drop their bodies, answer 200."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        # "head", "body" (remaining bytes counted), "chunk-size", "chunk-data",
        # "chunk-end" (the CRLF after a chunk), "trailers"
        self.state = "head"
        self.remaining = 0
        self.close_after = False
        self.stats_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        STATS[self.kind] += 1

    def data_received(self, data: bytes) -> None:
        if self.state in ("body", "chunk-data") and not self.buf:
            # The hot path: body bytes counted, never copied.
            if len(data) < self.remaining:
                self.remaining -= len(data)
                return
            data = data[self.remaining :]
            self.remaining = 0
            self._body_part_done()
        self.buf += data
        self._parse()

    def _body_part_done(self) -> None:
        if self.state == "body":
            self._respond()
        else:
            self.state = "chunk-end"

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self.state in ("body", "chunk-data"):
                take = min(self.remaining, len(buf))
                del buf[:take]
                self.remaining -= take
                if self.remaining:
                    return
                self._body_part_done()
                continue
            end = buf.find(b"\r\n\r\n" if self.state == "head" else b"\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail()
                return
            if self.state == "head":
                head = bytes(buf[:end])
                del buf[: end + 4]
                if not self._start_request(head):
                    return
            elif self.state == "chunk-size":
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    self._fail()
                    return
                if size == 0:
                    self.state = "trailers"
                else:
                    self.state, self.remaining = "chunk-data", size
            elif self.state == "chunk-end":
                del buf[: end + 2]
                self.state = "chunk-size"
            else:  # trailers: up to an empty line
                line_empty = end == 0
                del buf[: end + 2]
                if line_empty:
                    self._respond()

    def _start_request(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._fail()
            return False
        length = 0
        chunked = False
        self.close_after = parts[2] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                self.close_after = value.lower() == b"close"
        self.stats_request = parts[1] == b"/__stats"
        if chunked:
            self.state = "chunk-size"
        elif length:
            self.state, self.remaining = "body", length
        else:
            self._respond()
        return True

    def _respond(self) -> None:
        assert self.transport is not None
        self.state = "head"
        if self.stats_request:
            body = json.dumps(STATS).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        else:
            STATS["requests"] += 1
            self.transport.write(_RESPONSE_CLOSE if self.close_after else _RESPONSE)
        if self.close_after:
            self.transport.close()

    def _fail(self) -> None:
        STATS["bad"] += 1
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.close()


async def serve(cert: Optional[str], key: Optional[str]) -> None:
    loop = asyncio.get_running_loop()
    servers: List[asyncio.AbstractServer] = []
    ports: Dict[str, Optional[int]] = {"http": None, "tls": None}
    server = await loop.create_server(lambda: Sink("http"), "127.0.0.1", 0)
    servers.append(server)
    ports["http"] = server.sockets[0].getsockname()[1]
    if cert and key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        server = await loop.create_server(lambda: Sink("tls"), "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        ports["tls"] = server.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    # Serve until the parent closes our stdin (or terminates us).
    await loop.run_in_executor(None, sys.stdin.read)
    for listener in servers:
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", help="PEM certificate chain for the TLS listener")
    parser.add_argument("--key", help="PEM private key for the TLS listener")
    args = parser.parse_args()
    asyncio.run(serve(args.cert, args.key))


if __name__ == "__main__":
    main()
