"""Where a hot path's CPU goes: py-spy samples the server while wrk loads it.

    python scripts/profile.py                       # every path, 8 s each
    python scripts/profile.py --only memory,soldout --duration 5
    python scripts/profile.py --dsn postgresql://user@127.0.0.1:5432/db --output /tmp/p.md

Paths (--only picks among them), each on a server of its own, as scripts/bench.py runs them:

- memory:   IssueCoupon, memory store, 1 worker, a campaign too large to sell out, c=64
- postgres: IssueCoupon, Postgres store, 2 workers, c=128
- soldout:  IssueCoupon on a sold-out campaign, memory store, 1 worker, c=64
- redeem:   RedeemCoupon, Postgres store, 2 workers, one fresh code per request, c=64
- webhooks: IssueCoupon, Postgres store, 1 worker, webhooks on (delivered in the server to
            scripts/webhook_receiver.py), c=64

For each it prints (and writes to --output) the share of samples by layer (our package,
connectrpc, uvicorn, asyncio, psycopg, ...: the innermost frame that belongs to one, so the
standard library's frames count for whoever called them), the top frames by own samples, and
our functions by inclusive samples. py-spy samples every thread that is not
idle, so time in a system call (a socket write) counts as the frame that made it. It needs
ptrace rights over the server (root, or kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

PATHS = ("memory", "postgres", "soldout", "redeem", "webhooks")
RATE_HZ = 200
# A sample's layer: that of its innermost frame whose file matches one (stdlib frames match
# none, so they count for their caller's layer); the first pattern that matches wins.
LAYERS = (
    ("ours (coupon/)", re.compile(r"(^|/)coupon/")),
    ("connectrpc", re.compile(r"connectrpc/")),
    ("uvicorn + httptools", re.compile(r"uvicorn/|httptools")),
    ("psycopg + pool", re.compile(r"psycopg")),
    ("prometheus_client", re.compile(r"prometheus_client/")),
    ("protobuf", re.compile(r"protobuf")),
    ("asyncio / uvloop", re.compile(r"asyncio/|uvloop")),
)
OTHER_LAYER = "other (stdlib, ...)"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")


@dataclass
class Profile:
    title: str
    samples: int = 0
    own: collections.Counter[str] = field(default_factory=collections.Counter)
    ours_inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    layers: collections.Counter[str] = field(default_factory=collections.Counter)


def frame_name(frame: str) -> tuple[str, str]:
    """py-spy's 'function (path/file.py:line)' as ('function (file.py)', path)."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, ""
    path = match["file"]
    short = "/".join(Path(path).parts[-2:]) if is_ours(path) else Path(path).name
    return f"{match['function']} ({short})", path


def is_ours(path: str) -> bool:
    return LAYERS[0][1].search(path) is not None


def read_collapsed(path: Path, title: str) -> Profile:
    """Aggregate py-spy's raw (collapsed stack) output by function, line numbers dropped."""
    profile = Profile(title)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # With --subprocesses each stack starts with a 'process <pid>:"<command>"' frame.
        frames = [frame_name(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        profile.samples += count
        profile.own[frames[-1][0]] += count
        profile.layers[layer_of(frames)] += count
        for name in {name for name, file in frames if is_ours(file)}:
            profile.ours_inclusive[name] += count
    return profile


def layer_of(frames: list[tuple[str, str]]) -> str:
    for _, file in reversed(frames):
        for layer, pattern in LAYERS:
            if pattern.search(file):
                return layer
    return OTHER_LAYER


def render(profile: Profile, top: int) -> str:
    def share(count: int) -> str:
        return f"{100 * count / profile.samples:.1f}%"

    lines = [f"### {profile.title}", "", f"{profile.samples:,} samples at {RATE_HZ} Hz.", ""]
    lines += ["| layer (innermost frame of a known layer) | share |", "|---|---:|"]
    lines += [f"| {layer} | {share(n)} |" for layer, n in profile.layers.most_common()]
    lines += ["", "| top frames by own samples | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share(n)} |" for name, n in profile.own.most_common(top)]
    lines += ["", "| our functions, inclusive | share |", "|---|---:|"]
    # The entry points (server main, the ASGI app) include everything: start below them.
    ours = [
        (name, n)
        for name, n in profile.ours_inclusive.most_common()
        if not name.startswith(("main ", "_serve ", "<module> ", "create_app.<locals>.app "))
    ]
    lines += [f"| `{name}` | {share(n)} |" for name, n in ours[:top]]
    return "\n".join(lines) + "\n"


def profile_path(
    name: str, args: argparse.Namespace, workdir: Path, pg: bench.Postgres | None
) -> Profile:
    store, workers, connections, title = {
        "memory": ("memory", 1, 64, "IssueCoupon, memory store, 1 worker, c=64"),
        "postgres": ("postgres", 2, 128, "IssueCoupon, Postgres store, 2 workers, c=128"),
        "soldout": ("memory", 1, 64, "Sold-out storm, memory store, 1 worker, c=64"),
        "redeem": ("postgres", 2, 64, "RedeemCoupon, Postgres store, 2 workers, c=64"),
        "webhooks": ("postgres", 1, 64, "IssueCoupon, Postgres store, 1 worker, webhooks, c=64"),
    }[name]
    if store == "postgres" and pg is None:
        raise bench.BenchError("no PostgreSQL (see --dsn)")
    port = bench.free_port()
    base_url = f"http://127.0.0.1:{port}"
    dsn = pg.dsn if pg is not None else ""
    hook_url = ""
    receiver: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if name == "webhooks":
        receiver_port = bench.free_port()
        hook_url = f"http://127.0.0.1:{receiver_port}/hooks"
        receiver = bench.webhook_receiver(receiver_port, workdir)
    command = bench.coupon_server_command(
        workdir, store, workers, port, dsn, args.token, webhook_url=hook_url
    )
    raw = workdir / f"{name}.txt"
    with receiver, bench.server_process(command, base_url, workdir / f"{name}.log") as server:
        bench.warm_up(base_url, args, needs_campaign=True)
        total = {"soldout": 1, "redeem": bench.REDEEM_CODES_PER_S * args.duration}.get(
            name, bench.LARGE_CAMPAIGN
        )
        status, body = bench.rpc(
            base_url, "CreateCampaign", {"name": name, "total": total}, args.token
        )
        if status != 200:
            raise bench.BenchError(f"CreateCampaign answered HTTP {status}: {body}")
        campaign_id = body["campaignId"]
        load: dict[str, object] = {}
        if name == "soldout":
            bench.rpc(base_url, "IssueCoupon", {"campaignId": campaign_id}, "")
        if name == "redeem":
            codes_file = workdir / "codes.txt"
            codes = bench.seed_codes(base_url, campaign_id, total)
            codes_file.write_text("\n".join(codes) + "\n", encoding="utf-8")
            threads = str(bench.wrk_threads(connections))
            load = {
                "method": "RedeemCoupon",
                "script": bench.REDEEM_LUA,
                "script_args": (str(codes_file), threads),
            }
        # --subprocesses: with 2 workers the samples are the workers'; the supervisor idles.
        spy = subprocess.Popen(
            [
                args.py_spy, "record", "--pid", str(server.pid), "--subprocesses",
                "--nonblocking", "--rate", str(RATE_HZ), "--duration", str(args.duration),
                "--format", "raw", "--output", str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        bench.run_wrk(base_url, campaign_id, connections, args.duration, **load)  # type: ignore[arg-type]
        _, errors = spy.communicate(timeout=args.duration + 60)
        if spy.returncode != 0 or not raw.exists():
            raise bench.BenchError(f"py-spy failed: {errors.decode(errors='replace')[-500:]}")
    return read_collapsed(raw, title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PATHS), help="comma-separated paths")
    parser.add_argument("--duration", type=int, default=8, help="seconds sampled per path")
    parser.add_argument("--warmup", type=int, default=2, help="unsampled seconds first")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument("--dsn", default="", help="PostgreSQL (default: a pgserver of its own)")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    args.only = [p for p in args.only.split(",") if p]
    unknown = set(args.only) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s) {sorted(unknown)}; choose among {', '.join(PATHS)}")
    args.token = "profile-admin-token-0123456789"
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.py_spy).exists():
        print("py-spy is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    sections = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="coupon-profile-") as tmp:
        workdir = Path(tmp)
        pg = None
        try:
            if {"postgres", "redeem", "webhooks"} & set(args.only):
                pg = bench.provision_postgres(args, workdir)
            for name in args.only:
                bench.log(f"profiling {name} for {args.duration}s")
                try:
                    sections.append(render(profile_path(name, args, workdir, pg), args.top))
                except bench.BenchError as e:
                    failed = True
                    sections.append(f"### {name}\n\nnot profiled: {e}\n")
        finally:
            if pg is not None and pg.stop is not None:
                pg.stop()
    text = "\n".join(sections)
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
