#!/usr/bin/env python3
"""Request-by-request HTTP/1.1 load for the cluster scenarios (scripts/cluster.sh).

`ringtunnel bench` reports totals; the fault scenarios need to know *which*
requests failed and *when* relative to the fault (was it in flight on the
node that died? did anything fail 100 ms later?). This prober records every
request: start and end (wall clock, shared by all network namespaces), the
client port of its connection (joined with HAProxy's log to learn which
gateway served it), and its outcome.

  run      closed loop: C connections, each sends GET after GET (keep-alive)
           for D seconds; writes one CSV line per request:
           start,end,client_port,result,retried   (result: HTTP status or
           connect / timeout / reset / eof / bad; only 2xx and 3xx
           count as success)
  analyze  figures of a CSV around an event time T (key=value on one line)

A request sent on a reused keep-alive connection that sees the connection
close before any byte of the answer is retried once on a new connection,
as HTTP clients do for idempotent requests (RFC 9110, 9.2.2); such requests
count as retried, and as failed only if the retry fails too. After a
failure a worker pauses 20 ms before its next request, so a dead path
cannot turn into an unbounded count of failures.
"""

import argparse
import asyncio
import bisect
import re
import time


class Eof(Exception):
    """The connection closed (or reset) before any byte of the answer."""


class Bad(Exception):
    """An answer that is not HTTP/1.x."""


async def read_response(reader, method):
    try:
        line = await reader.readline()
    except (ConnectionResetError, BrokenPipeError):
        raise Eof()
    if not line:
        raise Eof()
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise Bad()
    status = int(parts[1])
    length, chunked, close = None, False, parts[0] == b"HTTP/1.0"
    while True:
        h = await reader.readline()
        if not h:
            raise asyncio.IncompleteReadError(b"", None)
        if h in (b"\r\n", b"\n"):
            break
        name, _, value = h.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            close = b"close" in value
    no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
    if no_body:
        pass
    elif chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            await reader.readexactly(size + 2)
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()  # close-delimited
        close = True
    return status, close


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer, self.used = reader, writer, 0
        self.port = writer.get_extra_info("sockname")[1]

    def close(self):
        try:
            self.writer.transport.abort()
        except Exception:
            pass


async def connect(host, port, timeout):
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    return Conn(r, w)


async def worker(args, host, port, request, out, stop_at):
    conn = None
    while time.time() < stop_at:
        t0 = time.time()
        retried = 0
        result = None
        for attempt in (0, 1):
            if conn is None:
                try:
                    conn = await connect(host, port, args.timeout)
                except (OSError, asyncio.TimeoutError):
                    result, lport = "connect", 0
                    break
            reused = conn.used > 0
            lport = conn.port
            try:
                conn.writer.write(request)
                status, close = await asyncio.wait_for(
                    read_response(conn.reader, args.method), args.timeout
                )
                conn.used += 1
                result = str(status)
                if close:
                    conn.close()
                    conn = None
                break
            except Eof:
                conn.close()
                conn = None
                if reused and attempt == 0:
                    retried = 1
                    continue
                result = "eof"
            except asyncio.TimeoutError:
                conn.close()
                conn = None
                result = "timeout"
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                conn.close()
                conn = None
                result = "reset"
            except (Bad, ValueError):
                conn.close()
                conn = None
                result = "bad"
            break
        t1 = time.time()
        out.append(f"{t0:.6f},{t1:.6f},{lport},{result},{retried}\n")
        if not ok(result):
            await asyncio.sleep(0.02)
    if conn is not None:
        conn.close()


async def run(args):
    host, _, port = args.target.rpartition(":")
    request = (
        f"{args.method} {args.path} HTTP/1.1\r\nHost: {args.host}\r\n"
        f"User-Agent: ringtunnel-cluster-probe\r\n\r\n"
    ).encode()
    out = []
    stop_at = time.time() + args.duration
    tasks = [
        asyncio.create_task(worker(args, host, int(port), request, out, stop_at))
        for _ in range(args.conns)
    ]
    await asyncio.gather(*tasks)
    with open(args.out, "w") as f:
        f.writelines(out)
    s = summarize(load(args.out))
    print(" ".join(f"{k}={v}" for k, v in s.items()))


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            a, b, port, result, retried = line.rstrip("\n").split(",")
            rows.append((float(a), float(b), int(port), result, int(retried)))
    rows.sort()
    return rows


def ok(result):
    # The scenarios ask the echo backend for "/": anything but a 2xx/3xx
    # (a 404 "no such session" from a node that cannot route, a 502, a
    # 503) is a failed request.
    return result.isdigit() and 200 <= int(result) < 400


def pct(sorted_vals, q):
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def summarize(rows):
    lat = sorted((b - a) * 1000 for a, b, _, r, _ in rows if ok(r))
    kinds = {}
    for r in rows:
        if not ok(r[3]):
            kinds[r[3]] = kinds.get(r[3], 0) + 1
    span = (rows[-1][1] - rows[0][0]) if rows else 0
    return {
        "requests": len(rows),
        "ok": len(lat),
        "failed": len(rows) - len(lat),
        "failed_kinds": ",".join(f"{k}:{v}" for k, v in sorted(kinds.items())) or "-",
        "retried": sum(r[4] for r in rows),
        "rps": f"{len(rows) / span:.0f}" if span > 0 else "0",
        "p50_ms": f"{pct(lat, 0.50):.2f}",
        "p99_ms": f"{pct(lat, 0.99):.2f}",
    }


LOG_RE = re.compile(r"^\S+:(\d+) (\d+)\.(\d+) \S+ \S+/(\S+) ")


def haproxy_map(path):
    """client port -> sorted [(accept time, server)] from the log-format of
    contrib/haproxy/haproxy.cfg.tmpl ("%ci:%cp %Ts.%ms %ft %b/%s ...")."""
    m = {}
    with open(path, errors="replace") as f:
        for line in f:
            g = LOG_RE.match(line)
            if g:
                t = int(g.group(2)) + int(g.group(3)) / 1000
                m.setdefault(int(g.group(1)), []).append((t, g.group(4)))
    for v in m.values():
        v.sort()
    return m


def server_of(hmap, port, start):
    v = hmap.get(port)
    if not v:
        return "?"
    # The connection accepted last before the request started (ports are
    # reused over a long run); 1 s slack for the log's ms resolution.
    i = bisect.bisect_right(v, (start + 1.0, "~")) - 1
    return v[i][1] if i >= 0 else v[0][1]


def analyze(args):
    rows = load(args.csv)
    t = args.at
    s = summarize(rows)
    hmap = haproxy_map(args.haproxy_log) if args.haproxy_log else {}
    servers = set(filter(None, (args.servers or "").split(",")))
    # In flight at t, or at any time in [t, until] when --until is given.
    until = max(args.until or t, t)
    inflight = [r for r in rows if r[0] <= until and r[1] > t]
    on = [r for r in inflight if server_of(hmap, r[2], r[0]) in servers]
    failed = [r for r in rows if not ok(r[3])]
    late = [r for r in failed if r[0] >= t + args.after_ms / 1000]
    before = [r for r in failed if r[1] < t]
    after = [r for r in rows if r[0] >= t + args.after_ms / 1000]
    s.update(
        {
            "inflight_at": len(inflight),
            "inflight_on": len(on),
            "failed_before": len(before),
            "failed_late": len(late),
            "late_requests": len(after),
            "last_fail_ms": f"{(failed[-1][0] - t) * 1000:.0f}" if failed else "-",
            "failed_servers": ",".join(
                sorted({server_of(hmap, r[2], r[0]) for r in failed})
            )
            or "-",
        }
    )
    print(" ".join(f"{k}={v}" for k, v in s.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--target", required=True, help="HOST:PORT")
    r.add_argument("--host", default="demo", help="Host header")
    r.add_argument("--path", default="/")
    r.add_argument("--method", default="GET")
    r.add_argument("--conns", type=int, default=50)
    r.add_argument("--duration", type=float, default=10)
    r.add_argument("--timeout", type=float, default=10, help="per request, seconds")
    r.add_argument("--out", required=True)
    a = sub.add_parser("analyze")
    a.add_argument("--csv", required=True)
    a.add_argument("--at", type=float, default=0.0, help="event time (unix seconds)")
    a.add_argument("--haproxy-log")
    a.add_argument("--servers", help="gateways (HAProxy server names) to count in-flight requests on")
    a.add_argument("--until", type=float, help="count requests in flight at any time in [at, until]")
    a.add_argument("--after-ms", type=float, default=100, help="failed_late: failures starting this long after --at")
    args = p.parse_args()
    if args.cmd == "run":
        asyncio.run(run(args))
    else:
        analyze(args)


if __name__ == "__main__":
    main()
