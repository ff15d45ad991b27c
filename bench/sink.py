"""A fast SMTP sink for the benchmark: accepts everything, keeps nothing, counts.

Run it on its own (``python -m bench.sink --port 2525``) or let
``python -m bench`` start it in a separate process. It is a
hand-written asyncio protocol rather than aiosmtpd, which spends more CPU per
transaction than the client under test and would be the bottleneck.

It speaks just enough SMTP for smtplib: EHLO/HELO (advertising 8BITMIME,
SMTPUTF8 and SIZE; PIPELINING only with ``--pipelining``, though commands
that arrive together are always handled in order and answered in one write),
MAIL, RCPT, DATA, RSET, NOOP, QUIT. The
message body is not kept, not dot-unstuffed and not parsed: only the end of
data (``CRLF . CRLF``) is looked for. One extra command, ``XCOUNT``, answers
``250 <messages> <recipients> <connections> <bytes>``: the totals since the
sink started, so the benchmark can check that every message arrived.

This module imports nothing from Django or listdelivery.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

GREETING = b"220 bench-sink ESMTP ready\r\n"
EHLO_REPLY = b"250-bench-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 104857600\r\n"
EHLO_PIPELINING = b"250-bench-sink\r\n250-PIPELINING\r\n" + EHLO_REPLY.split(b"\r\n", 1)[1]
OK = b"250 OK\r\n"
QUEUED = b"250 OK queued\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BYE = b"221 Bye\r\n"
UNKNOWN = b"500 Command not recognized\r\n"
NO_MAIL = b"503 Need MAIL first\r\n"
NO_RCPT = b"503 Need RCPT first\r\n"
TOO_LONG = b"500 Line too long\r\n"
END_OF_DATA = b"\r\n.\r\n"
MAX_LINE = 64 * 1024


class Stats:
    __slots__ = ("bytes", "connections", "messages", "recipients")

    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.connections = 0
        self.bytes = 0

    def reply(self) -> bytes:
        return f"250 {self.messages} {self.recipients} {self.connections} {self.bytes}\r\n".encode()


class SinkProtocol(asyncio.Protocol):
    """One SMTP session. Commands are handled as whole CRLF-ended lines arrive."""

    def __init__(self, stats: Stats, ehlo: bytes = EHLO_REPLY) -> None:
        self.stats = stats
        self.ehlo = ehlo
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []  # replies to this read, sent in one write
        self.buffer = b""
        self.in_data = False
        self.tail = b""  # the last bytes of data seen, to find CRLF.CRLF across reads
        self.size = 0
        self.in_mail = False
        self.rcpts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.connections += 1
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        out = self.out
        open_ = True
        while data and open_:
            if self.in_data:
                data = self._data(data)
                continue
            buffer = self.buffer + data if self.buffer else data
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_LINE:
                    out.append(TOO_LONG)
                    open_ = False
                    break
                self.buffer = buffer
                break
            self.buffer = b""
            line, data = buffer[:end], buffer[end + 2 :]
            open_ = self._command(line)
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if not open_:
            self.transport.close()

    def _data(self, data: bytes) -> bytes:
        """Consume message data; return what follows the end of data, if anything."""
        joined = self.tail + data
        end = joined.find(END_OF_DATA)
        if end < 0:
            self.size += len(data)
            self.tail = joined[-4:]
            return b""
        consumed = end + len(END_OF_DATA) - len(self.tail)
        self.size += consumed
        stats = self.stats
        stats.messages += 1
        stats.recipients += self.rcpts
        stats.bytes += self.size
        self.in_data = self.in_mail = False
        self.rcpts = 0
        self.out.append(QUEUED)
        return data[consumed:]

    def _command(self, line: bytes) -> bool:
        verb = line[:4].upper()
        write = self.out.append
        if verb == b"RCPT":
            if not self.in_mail:
                write(NO_MAIL)
            else:
                self.rcpts += 1
                write(OK)
        elif verb == b"MAIL":
            self.in_mail, self.rcpts = True, 0
            write(OK)
        elif verb == b"DATA":
            if not self.rcpts:
                write(NO_RCPT)
            else:
                self.in_data, self.tail, self.size = True, b"\r\n", 0
                write(GO_AHEAD)
        elif verb == b"EHLO":
            self.in_mail, self.rcpts = False, 0
            write(self.ehlo)
        elif verb == b"HELO":
            self.in_mail, self.rcpts = False, 0
            write(b"250 bench-sink\r\n")
        elif verb == b"RSET":
            self.in_mail, self.rcpts = False, 0
            write(OK)
        elif verb == b"NOOP":
            write(OK)
        elif verb == b"QUIT":
            write(BYE)
            return False
        elif line[:6].upper() == b"XCOUNT":
            write(self.stats.reply())
        else:
            write(UNKNOWN)
        return True


async def serve(host: str, port: int, *, pipelining: bool = False) -> None:
    stats = Stats()
    ehlo = EHLO_PIPELINING if pipelining else EHLO_REPLY
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkProtocol(stats, ehlo), host, port, reuse_address=True, backlog=512
    )
    bound = server.sockets[0].getsockname()
    print(f"LISTENING {bound[0]} {bound[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--pipelining", action="store_true", help="advertise PIPELINING")
    options = parser.parse_args(argv)
    asyncio.run(serve(options.host, options.port, pipelining=options.pipelining))
    return 0


if __name__ == "__main__":
    sys.exit(main())
