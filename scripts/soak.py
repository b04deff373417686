#!/usr/bin/env python3
"""Helper for scripts/soak.sh (python3 standard library only).

  soak.py clients ADDR HOST SECS [KINDS]
      Misbehaving HTTP clients against the gateway's public ADDR for SECS
      seconds, all at once in threads: aborted uploads, cancelled
      downloads, stalled readers, bad chunked bodies, garbage bytes.
      KINDS (comma separated, default all): a subset of
      aborted_upload,cancelled_download,stalled_reader,bad_chunked,garbage.
      Every socket has a timeout, every loop a deadline and a count cap.
      Prints one summary line per kind at the end.

  soak.py report CSV SVG [--rss-pct P] [--rss-min-kib K] [--fd-tol N]
      Reads the per-second CSV written by soak.sh, prints the summary
      table (start after warm-up, max, end after the quiet period,
      verdict per series), writes the SVG chart and exits 1 if any
      series GREW (or is missing at the end).
"""

import csv
import os
import random
import socket
import sys
import threading
import time

# ---------------------------------------------------------------- clients

SOCK_TIMEOUT = 2.0  # connect / send / recv, every socket


class Tally:
    def __init__(self, kind):
        self.kind = kind
        self.lock = threading.Lock()
        self.ops = 0
        self.errors = 0
        self.answers = {}

    def add(self, answer=None, error=False):
        with self.lock:
            self.ops += 1
            if error:
                self.errors += 1
            if answer is not None:
                self.answers[answer] = self.answers.get(answer, 0) + 1

    def line(self):
        ans = " ".join("%s=%d" % kv for kv in sorted(self.answers.items()))
        return "%-18s ops=%d connect/send_errors=%d %s" % (self.kind, self.ops, self.errors, ans)


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=SOCK_TIMEOUT)
    s.settimeout(SOCK_TIMEOUT)
    return s


def close_rst(s):
    """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    s.close()


def read_status(s, wait):
    """Status code of the first response within WAIT seconds, or
    'no_answer' (timeout) / 'closed' (EOF or reset without a response)."""
    s.settimeout(wait)
    buf = b""
    try:
        while b"\r\n" not in buf and len(buf) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                return "closed" if not buf else "partial"
            buf += chunk
    except socket.timeout:
        return "no_answer" if not buf else "partial"
    except OSError:
        return "closed"
    parts = buf.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) > 1 else "garbled"


def paced(deadline, every, cap, body):
    """Runs body() every EVERY seconds until DEADLINE, at most CAP times."""
    n = 0
    nxt = time.monotonic()
    while n < cap and time.monotonic() < deadline:
        body()
        n += 1
        nxt += every
        pause = min(nxt, deadline) - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def aborted_upload(addr, host, deadline, secs):
    t = Tally("aborted_upload")
    rnd = random.Random(1)

    def one():
        try:
            s = connect(addr)
            s.sendall(("POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: 100000\r\n"
                       "Content-Type: application/octet-stream\r\n\r\n" % host).encode())
            s.sendall(b"x" * rnd.randint(0, 60000))
            time.sleep(0.01)
            if t.ops % 2:
                close_rst(s)
            else:
                s.close()
            t.add("sent_part")
        except OSError:
            t.add(error=True)

    paced(deadline, 0.2, int(secs * 5) + 5, one)
    return t


def cancelled_download(addr, host, deadline, secs):
    t = Tally("cancelled_download")

    def one():
        try:
            s = connect(addr)
            s.sendall(("GET /bytes/50000000 HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
            got = 0
            end = time.monotonic() + 0.03
            s.settimeout(0.01)
            while time.monotonic() < end:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                got += len(chunk)
            s.close()  # unread data pending: the kernel sends RST
            t.add("got_bytes" if got else "got_nothing")
        except OSError:
            t.add(error=True)

    paced(deadline, 0.2, int(secs * 5) + 5, one)
    return t


def stalled_reader(addr, host, deadline, secs, tally, seed):
    rnd = random.Random(seed)
    n = 0
    while time.monotonic() < deadline - 1 and n < int(secs / 5) + 2:
        n += 1
        try:
            s = connect(addr)
            s.sendall(("GET /bytes/20000000 HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
            stall = min(rnd.uniform(5, 20), max(0.0, deadline - time.monotonic()))
            time.sleep(stall)
            s.close()
            tally.add("stalled")
        except OSError:
            tally.add(error=True)
            time.sleep(0.5)


BAD_CHUNKED = [
    ("not_hex", b"zz\r\nhello\r\n0\r\n\r\n"),  # chunk size not hex
    ("no_crlf", b"5\r\nhelloXX0\r\n\r\n"),  # no CRLF after the chunk data
    ("overflow", b"fffffffffffffffffffffff\r\nhello\r\n"),  # size overflows u64
    ("negative", b"-1\r\nhello\r\n0\r\n\r\n"),  # negative size
]

GARBAGE = [
    ("random", None),  # 200 random bytes
    ("tls_hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
    ("bad_header", b"GET / HTTP/1.1\r\nHost: %s\r\nThis is not a header\r\n\r\n"),
    ("bad_line", b"GARBAGE\r\n\r\n"),
    ("http_9_9", b"GET /bytes/10 HTTP/9.9\r\nHost: %s\r\n\r\n"),
]


def bad_chunked(addr, host, deadline, secs):
    t = Tally("bad_chunked")
    i = [0]

    def one():
        name, body = BAD_CHUNKED[i[0] % len(BAD_CHUNKED)]
        i[0] += 1
        try:
            s = connect(addr)
            s.sendall(("POST /echo HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                       % host).encode() + body)
            t.add(name + ":" + read_status(s, 2.0))
            s.close()
        except OSError:
            t.add(error=True)

    paced(deadline, 0.5, int(secs * 2) + 5, one)
    return t


def garbage(addr, host, deadline, secs):
    t = Tally("garbage")
    rnd = random.Random(2)
    i = [0]

    def one():
        name, g = GARBAGE[i[0] % len(GARBAGE)]
        i[0] += 1
        if g is None:
            g = bytes(rnd.getrandbits(8) for _ in range(200))
        elif b"%s" in g:
            g = g.replace(b"%s", host.encode())
        try:
            s = connect(addr)
            s.sendall(g)
            t.add(name + ":" + read_status(s, 2.0))
            s.close()
        except OSError:
            t.add(error=True)

    paced(deadline, 0.5, int(secs * 2) + 5, one)
    return t


KINDS = ("aborted_upload", "cancelled_download", "stalled_reader", "bad_chunked", "garbage")


def run_clients(addr, host, secs, kinds=",".join(KINDS)):
    want = set(k for k in kinds.split(",") if k and k != "none")
    unknown = want - set(KINDS)
    if unknown:
        print("unknown client kind(s): %s (known: %s)" % (",".join(sorted(unknown)), ",".join(KINDS)),
              file=sys.stderr)
        return 2
    secs = float(secs)
    deadline = time.monotonic() + secs
    results = []
    lock = threading.Lock()

    def wrap(fn, *args):
        r = fn(addr, host, deadline, secs, *args)
        if r is not None:
            with lock:
                results.append(r)

    stalled = Tally("stalled_reader")
    threads = [threading.Thread(target=wrap, args=(f,), daemon=True)
               for f in (aborted_upload, cancelled_download, bad_chunked, garbage)
               if f.__name__ in want]
    if "stalled_reader" in want:
        threads += [threading.Thread(target=wrap, args=(stalled_reader, stalled, k), daemon=True)
                    for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(1.0, deadline - time.monotonic() + 10))
    if "stalled_reader" in want:
        results.append(stalled)
    for r in sorted(results, key=lambda r: r.kind):
        print(r.line())
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------- report

# (column, label, kind); kind: gauge = must return to its start value,
# fds = start + tolerance, rss = start + max(pct, min KiB), info = shown,
# no verdict. The agent keeps idle keep-alive connections to the backend
# (a pool bounded per core, no idle expiry), so its raw fd count follows
# the peak backend concurrency it has seen, not time: the fd verdict is on
# its fds minus those connections (agent_fds_net, computed here).
SERIES = [
    ("gw_rss_kib", "gateway RSS KiB", "rss"),
    ("gw_fds", "gateway fds", "fds"),
    ("gw_streams", "gateway active streams", "gauge"),
    ("gw_conns", "gateway public conns", "gauge"),
    ("gw_uplinks", "gateway uplinks", "gauge"),
    ("gw_closewait", "gateway CLOSE_WAIT sockets", "gauge"),
    ("agent_rss_kib", "agent RSS KiB", "rss"),
    ("agent_fds", "agent fds (all)", "info"),
    ("agent_backend", "agent backend conns", "info"),
    ("agent_fds_net", "agent fds excl. backend", "fds"),
    ("agent_streams", "agent active streams", "gauge"),
    ("agent_uplinks", "agent uplinks", "gauge"),
]


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt(v):
    if v is None:
        return "-"
    return "%d" % v if v == int(v) else "%.1f" % v


def limit_for(kind, start, opts):
    if kind == "rss":
        return start + max(start * opts["rss_pct"] / 100.0, opts["rss_min_kib"])
    if kind == "fds":
        return start + opts["fd_tol"]
    return start


def verdicts(rows, opts):
    out = []
    base = [r for r in rows if r["phase"] == "baseline"]
    quiet = [r for r in rows if r["phase"] == "quiet"]
    for col, label, kind in SERIES:
        vals = [num(r.get(col)) for r in rows]
        known = [v for v in vals if v is not None]
        start = next((num(r.get(col)) for r in reversed(base) if num(r.get(col)) is not None), None)
        end = next((num(r.get(col)) for r in reversed(quiet) if num(r.get(col)) is not None), None)
        peak = max(known) if known else None
        if kind == "info":
            out.append((col, label, kind, start, peak, end, None, "(info)"))
            continue
        if start is None or end is None:
            out.append((col, label, kind, start, peak, end, None, "MISSING"))
            continue
        lim = limit_for(kind, start, opts)
        if end > lim:
            v = "GREW"
        elif kind == "gauge" and end < start:
            v = "DROPPED"
        else:
            v = "flat"
        out.append((col, label, kind, start, peak, end, lim, v))
    return out


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_chart(rows, res, path, opts):
    ts = [num(r["t"]) for r in rows]
    t_max = max(t for t in ts if t is not None) or 1.0
    cols, w, h = 2, 460, 170
    pad_l, pad_r, pad_t, pad_b = 62, 12, 26, 26
    n = len(res)
    height = 40 + ((n + cols - 1) // cols) * (h + 10) + 24
    width = cols * (w + 10) + 10
    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
         'font-family="sans-serif" font-size="11">' % (width, height),
         '<rect width="100%" height="100%" fill="white"/>',
         '<text x="10" y="22" font-size="15">ringtunnel soak: per-second samples '
         '(shaded: load phase; red ticks: agent restarts; dashed: limit for the verdict)</text>']
    load_ts = [num(r["t"]) for r in rows if r["phase"] == "load"]
    restarts = []
    prev = None
    for r in rows:
        if r.get("agent_pid") and prev and r["agent_pid"] != prev:
            restarts.append(num(r["t"]))
        if r.get("agent_pid"):
            prev = r["agent_pid"]
    for i, (col, label, kind, start, peak, end, lim, verdict) in enumerate(res):
        x0 = 10 + (i % cols) * (w + 10)
        y0 = 36 + (i // cols) * (h + 10)
        pts = [(num(r["t"]), num(r.get(col))) for r in rows]
        pts = [(t, v) for t, v in pts if t is not None and v is not None]
        vals = [v for _, v in pts] + ([lim] if lim is not None else [])
        lo = min(vals) if vals else 0.0
        hi = max(vals) if vals else 1.0
        if kind != "rss":
            lo = min(lo, 0.0)
        if hi - lo < 1e-9:
            hi = lo + 1.0
        pw, ph = w - pad_l - pad_r, h - pad_t - pad_b

        def X(t):
            return x0 + pad_l + pw * t / t_max

        def Y(v):
            return y0 + pad_t + ph * (1 - (v - lo) / (hi - lo))

        color = {"flat": "#2e7d32", "(info)": "#555"}.get(verdict, "#c62828")
        o.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#bbb"/>'
                 % (x0, y0, w, h))
        o.append('<text x="%d" y="%d" font-size="12">%s: <tspan fill="%s" font-weight="bold">%s'
                 '</tspan> (start %s, max %s, end %s)</text>'
                 % (x0 + 6, y0 + 16, esc(label), color, verdict, fmt(start), fmt(peak), fmt(end)))
        if load_ts:
            a, b = min(load_ts), max(load_ts)
            o.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#e3f2fd"/>'
                     % (X(a), y0 + pad_t, max(1.0, X(b) - X(a)), ph))
        for t in restarts:
            o.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#e53935" stroke-width="1"/>'
                     % (X(t), X(t), y0 + pad_t + ph - 8, y0 + pad_t + ph))
        o.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#555"/>'
                 % (x0 + pad_l, x0 + pad_l, y0 + pad_t, y0 + pad_t + ph))
        o.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#555"/>'
                 % (x0 + pad_l, x0 + pad_l + pw, y0 + pad_t + ph, y0 + pad_t + ph))
        for v in (lo, (lo + hi) / 2, hi):
            o.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>'
                     % (x0 + pad_l - 4, Y(v) + 4, fmt(round(v, 1))))
        for t in (0, t_max / 2, t_max):
            o.append('<text x="%.1f" y="%d" text-anchor="middle">%ds</text>'
                     % (X(t), y0 + h - 8, t))
        if lim is not None:
            o.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ef6c00" '
                     'stroke-dasharray="4 3"/>' % (x0 + pad_l, x0 + pad_l + pw, Y(lim), Y(lim)))
        # Gaps (missing samples, e.g. while the agent restarts) break the line.
        seg = []
        segs = [seg]
        last_t = None
        for t, v in pts:
            if last_t is not None and t - last_t > 2.5:
                seg = []
                segs.append(seg)
            seg.append("%.1f,%.1f" % (X(t), Y(v)))
            last_t = t
        for s in segs:
            if s:
                o.append('<polyline fill="none" stroke="#1565c0" stroke-width="1.3" points="%s"/>'
                         % " ".join(s))
    o.append('<text x="10" y="%d" fill="#555">RSS limit: start + max(%g%%, %d KiB); fds limit: '
             'start + %d; gauges must end at their start value. Time: seconds since start.</text>'
             % (height - 8, opts["rss_pct"], opts["rss_min_kib"], opts["fd_tol"]))
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def report(argv):
    if len(argv) < 2:
        print("usage: soak.py report CSV SVG [--rss-pct P] [--rss-min-kib K] [--fd-tol N]",
              file=sys.stderr)
        return 2
    csv_path, svg_path = argv[0], argv[1]
    opts = {"rss_pct": 20.0, "rss_min_kib": 8192, "fd_tol": 4}
    rest = argv[2:]
    while rest:
        k, v = rest[0], rest[1] if len(rest) > 1 else None
        if v is None:
            print("missing value for %s" % k, file=sys.stderr)
            return 2
        if k == "--rss-pct":
            opts["rss_pct"] = float(v)
        elif k == "--rss-min-kib":
            opts["rss_min_kib"] = int(v)
        elif k == "--fd-tol":
            opts["fd_tol"] = int(v)
        else:
            print("unknown option %s" % k, file=sys.stderr)
            return 2
        rest = rest[2:]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print("no samples in %s" % csv_path, file=sys.stderr)
        return 1
    for r in rows:
        fds, backend = num(r.get("agent_fds")), num(r.get("agent_backend"))
        r["agent_fds_net"] = "" if fds is None or backend is None else str(int(fds - backend))
    res = verdicts(rows, opts)
    print("%-28s %10s %10s %10s %10s  %s" % ("series", "start", "max", "end", "limit", "verdict"))
    for col, label, kind, start, peak, end, lim, v in res:
        print("%-28s %10s %10s %10s %10s  %s" % (label, fmt(start), fmt(peak), fmt(end),
                                                 fmt(lim if lim is None else int(lim)), v))
    svg_chart(rows, res, svg_path, opts)
    bad = [r[1] for r in res if r[7] not in ("flat", "(info)")]
    if bad:
        print("not flat: " + ", ".join(bad))
        return 1
    print("all series flat")
    return 0


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "clients" and len(sys.argv) in (5, 6):
        return run_clients(*sys.argv[2:])
    if len(sys.argv) >= 2 and sys.argv[1] == "report":
        return report(sys.argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
