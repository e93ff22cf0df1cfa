"""Server CPU per delivered frame and delivery latency of one busy room, against references.

Three servers run side by side for the whole invocation, each started by
``bench.harness.SERVER_COMMAND`` (daphne by default):

- ``project``:  ``project.asgi:application`` (SQLite, in-memory layer, DEBUG off, the rate
  limit off as in the e2e tests), accounts logged in through the real login form, room lobby;
- ``tutorial``: the Channels tutorial's consumer (``bench/tutorial``: group_send, then one
  ``json.dumps`` per recipient), same layer configuration;
- ``bare``:     a bare ASGI broadcast (``bench/bare_asgi.py``: a dict of send callables, the
  received text sent as it is).

With ``--baseline-ref REF`` a fourth server runs the project from a temporary ``git worktree``
of REF. With ``--servers runner,uvicorn`` every variant runs once per named server
(``bench.harness.SERVER_COMMANDS``; ``uvicorn+deflate``: its clients offer permessage-deflate,
as browsers do), named ``project runner``, ``project uvicorn``, ..., with ratios to the first.
Each has its own client process (``bench.fanout_client``) holding ``--subscribers`` +
``--publishers`` sockets in one room. Every repetition runs three phases, each variant in
turn (the order rotates between repetitions):

- ``throughput``: ``--messages`` messages shared by all publishers, each keeping up to
  ``--window`` in flight (the next one leaves when the echo of an earlier one arrives);
- ``window 1``:  ``--latency-messages`` messages, every publisher one in flight;
- ``1 publisher``: ``--single-messages`` messages from one publisher, one in flight
  (latency without a queue in front of it).

Server CPU is utime + stime of the server process (and any children) from /proc/<pid>/stat
around a phase, divided by the message frames delivered to all sockets of the room (the
publishers receive every message too). Latency is send -> receive at the subscribers. The
client's own CPU is printed next to it: near 100 % of one core, the client limits throughput.

    .venv/bin/python -m bench.fanout [--quick] [--reps 3] [--messages 100]
        [--baseline-ref 6a7fcbc] [--servers runner,uvicorn,uvicorn+deflate]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import harness
from bench.harness import Server, ServerChoice, Tree

LOBBY = "lobby"
TUTORIAL_PATH = "/ws/chat/lobby/"
BARE_PATH = "/ws/bench/"
PHASES = ("throughput", "window 1", "1 publisher")
WARMUP_MESSAGES = 10


@dataclass
class Variant:
    name: str
    server: Server
    path: str
    protocol: str
    cookies: list[str] = field(default_factory=list)
    family: str = ""  # project, tutorial, bare: what ratios compare across servers
    server_label: str = ""  # the --servers entry it runs on ("" without --servers)
    compression: str | None = None  # what its client offers (websockets' ``compression``)
    client: subprocess.Popen[str] | None = None
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def start_client(self, subscribers: int, publishers: int, log: IO[str]) -> float:
        config = {
            "url": self.server.ws_url(self.path),
            "origin": self.server.base_url,
            "cookies": self.cookies,
            "protocol": self.protocol,
            "compression": self.compression,
            "subscribers": subscribers,
            "publishers": publishers,
        }
        self.client = subprocess.Popen(
            [sys.executable, "-m", "bench.fanout_client", json.dumps(config)],
            cwd=harness.REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        return float(self._reply()["connect_seconds"])

    def _reply(self) -> dict[str, Any]:
        assert self.client is not None and self.client.stdout is not None
        line = self.client.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} client exited (see its log)")
        return dict(json.loads(line))

    def run(self, tag: str, publishers: int, window: int, messages: int) -> dict[str, Any]:
        """One phase: the client's counts plus the server CPU it cost."""
        assert self.client is not None and self.client.stdin is not None
        command = {
            "cmd": "run", "tag": tag, "publishers": publishers, "window": window,
            "messages": messages,
        }  # fmt: skip
        cpu_before = self.server.cpu_seconds()
        self.client.stdin.write(json.dumps(command) + "\n")
        self.client.stdin.flush()
        result = self._reply()
        result["server_cpu_seconds"] = self.server.cpu_seconds() - cpu_before
        return result

    def stop_client(self) -> None:
        if self.client is None:
            return
        if self.client.stdin is not None:
            with contextlib.suppress(OSError):  # the client may be gone already
                self.client.stdin.write('{"cmd": "quit"}\n')
                self.client.stdin.close()
        try:
            self.client.wait(30)
        except subprocess.TimeoutExpired:
            self.client.kill()


def project_variant(
    name: str, tree: Tree, tmp: Path, accounts: int, choice: ServerChoice | None = None
) -> Variant:
    env = harness.project_env(tmp / f"{name}.sqlite3")
    usernames = [f"bench{i}" for i in range(accounts)]
    harness.prepare_project(tree, env, usernames, {LOBBY: 0})
    server = Server(harness.PROJECT_APP, env, tree, choice.command if choice else None).start()
    cookies = harness.login_all(server.base_url, usernames)
    return Variant(name, server, f"/ws/chat/{LOBBY}/", "project", cookies)


def on_server(variant: Variant, family: str, choice: ServerChoice | None) -> Variant:
    """Mark ``variant`` as ``family`` served by ``choice`` (None: the default command)."""
    variant.family = family
    variant.server_label = choice.label if choice else ""
    variant.compression = choice.compression if choice else None
    return variant


def per_frame_us(seconds: float, frames: int) -> float:
    return seconds / frames * 1e6 if frames else float("nan")


def describe(name: str, phase: str, r: dict[str, Any]) -> str:
    lost = r["expected"] - r["delivered"]
    return (
        f"{name:22s} {phase:12s} frames {r['delivered']:7d}"
        + (f" (lost {lost})" if lost else "")
        + f"  {r['wall_seconds']:6.2f} s  server {r['server_cpu_seconds']:6.2f} s CPU "
        f"= {per_frame_us(r['server_cpu_seconds'], r['delivered']):7.1f} us/frame  "
        f"client {per_frame_us(r['client_cpu_seconds'], r['delivered']):5.1f} us/frame "
        f"({100 * r['client_cpu_seconds'] / max(r['wall_seconds'], 1e-9):3.0f} % CPU)  "
        f"latency p50 {r['latency_p50_ms']:8.1f} ms  p99 {r['latency_p99_ms']:8.1f} ms"
    )


def summarize(variants: list[Variant]) -> None:
    med = harness.median
    print("\nmedians over repetitions")
    print(
        f"{'variant':22s} {'server us/frame':>15s} {'frames/s':>9s} {'client us/frame':>15s}"
        f" {'client CPU':>10s} | {'window 1 p50/p99 ms':>21s} | {'1 publisher p50/p99 ms':>22s}"
        f" | lost"
    )
    rows: dict[str, float] = {}
    for v in variants:
        tp, w1, one = (v.results[p] for p in PHASES)
        us = med([per_frame_us(r["server_cpu_seconds"], r["delivered"]) for r in tp])
        rows[v.name] = us
        fps = med([r["delivered"] / r["wall_seconds"] for r in tp])
        client = med([per_frame_us(r["client_cpu_seconds"], r["delivered"]) for r in tp])
        util = med([100 * r["client_cpu_seconds"] / r["wall_seconds"] for r in tp])
        lost = sum(r["expected"] - r["delivered"] for p in PHASES for r in v.results[p])
        print(
            f"{v.name:22s} {us:15.1f} {fps:9.0f} {client:15.1f} {util:9.0f}% |"
            f" {med([r['latency_p50_ms'] for r in w1]):10.1f}"
            f" {med([r['latency_p99_ms'] for r in w1]):10.1f} |"
            f" {med([r['latency_p50_ms'] for r in one]):10.1f}"
            f" {med([r['latency_p99_ms'] for r in one]):11.1f} | {lost}"
        )
    by_key = {(v.family, v.server_label): v.name for v in variants}
    for v in variants:
        bare = by_key.get(("bare", v.server_label))
        if v.family != "bare" and bare is not None:
            ratio = harness.ratio(rows[v.name], rows[bare])
            print(f"ratio {v.name}/{bare} server CPU per frame: {ratio}")
        tutorial = by_key.get(("tutorial", v.server_label))
        if v.family == "project" and tutorial is not None:
            ratio = harness.ratio(rows[v.name], rows[tutorial])
            print(f"ratio {v.name}/{tutorial} server CPU per frame: {ratio}")
    for name in [name for name in rows if name.startswith("project@")]:
        change = harness.ratio(rows.get("project", float("nan")), rows[name])
        print(f"ratio project/{name} server CPU per frame: {change}")
    compare_servers(variants)


def compare_servers(variants: list[Variant]) -> None:
    """Ratios of each variant on a later ``--servers`` entry to the same one on the first."""
    labels = list(dict.fromkeys(v.server_label for v in variants if v.server_label))
    first = {v.family: v for v in variants if labels and v.server_label == labels[0]}
    med = harness.median
    for v in variants:
        base = first.get(v.family)
        if base is None or v is base or not v.server_label:
            continue

        def cpu(x: Variant) -> float:
            return med([per_frame_us(r["server_cpu_seconds"], r["delivered"])
                        for r in x.results["throughput"]])  # fmt: skip

        def fps(x: Variant) -> float:
            return med([r["delivered"] / r["wall_seconds"] for r in x.results["throughput"]])

        def p50(x: Variant, phase: str) -> float:
            return med([r["latency_p50_ms"] for r in x.results[phase]])

        print(
            f"ratio {v.name}/{base.name}: server CPU per frame {harness.ratio(cpu(v), cpu(base))},"
            f" frames/s {harness.ratio(fps(v), fps(base))},"
            f" window 1 p50 {harness.ratio(p50(v, 'window 1'), p50(base, 'window 1'))},"
            f" 1 publisher p50 {harness.ratio(p50(v, '1 publisher'), p50(base, '1 publisher'))}"
        )


def start_variants(
    args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack
) -> list[Variant]:
    names = args.variants.split(",")
    variants: list[Variant] = []

    def keep(variant: Variant) -> None:
        variants.append(variant)
        stack.callback(variant.server.cleanup)
        stack.callback(variant.stop_client)

    choices: list[ServerChoice | None] = [*harness.parse_servers(args.servers)] or [None]
    for choice in choices:
        suffix = f" {choice.label}" if choice else ""
        command = choice.command if choice else None
        if "project" in names:
            variant = project_variant("project" + suffix, harness.CURRENT, tmp, args.accounts,
                                      choice)  # fmt: skip
            keep(on_server(variant, "project", choice))
        if "tutorial" in names:
            server = Server(harness.TUTORIAL_APP, harness.reference_env(), command=command)
            variant = Variant("tutorial" + suffix, server.start(), TUTORIAL_PATH, "tutorial")
            keep(on_server(variant, "tutorial", choice))
        if "bare" in names:
            server = Server(harness.BARE_APP, harness.reference_env(), command=command)
            variant = Variant("bare" + suffix, server.start(), BARE_PATH, "bare")
            keep(on_server(variant, "bare", choice))
    if args.baseline_ref:
        tree = stack.enter_context(harness.baseline_tree(args.baseline_ref))
        name = f"project@{tree.label.split('@')[1]}"
        keep(on_server(project_variant(name, tree, tmp, args.accounts), "project@", None))
    return variants


def measure(args: argparse.Namespace, variants: list[Variant], log: IO[str]) -> None:
    sockets = args.subscribers + args.publishers
    for v in variants:
        seconds = v.start_client(args.subscribers, args.publishers, log)
        print(f"{v.name:22s} {sockets} sockets open in {seconds:.1f} s", flush=True)
        # The first messages of a process import and start things (thread pool, caches).
        v.run("warmup", args.publishers, args.window, WARMUP_MESSAGES)
        v.results = {phase: [] for phase in PHASES}
    plan = {
        "throughput": (args.publishers, args.window, args.messages),
        "window 1": (args.publishers, 1, args.latency_messages),
        "1 publisher": (1, 1, args.single_messages),
    }
    phases = list(PHASES)
    if args.messages == args.latency_messages <= args.publishers:
        # No publisher sends more than one message: the window cannot matter, and the
        # throughput phase is the window-1 phase. Run it once.
        phases.remove("window 1")
        for v in variants:
            v.results["window 1"] = v.results["throughput"]
        print("(every publisher sends at most one message: throughput = window 1 phase)")
    for rep in range(args.reps):
        shift = rep % len(variants)
        order = variants[shift:] + variants[:shift]
        for p_index, phase in enumerate(phases):
            for v in order:
                if rep == 0 and phase == args.profile_phase:
                    v.server.profile()  # BENCH_PROFILE=DIR: py-spy from here to the end
                result = v.run(f"r{rep}p{p_index}", *plan[phase])
                v.results[phase].append(result)
                print(f"rep {rep + 1} " + describe(v.name, phase, result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--publishers", type=int, default=100)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--messages", type=int, default=100, help="throughput phase")
    parser.add_argument("--latency-messages", type=int, default=100, help="window 1 phase")
    parser.add_argument("--single-messages", type=int, default=10, help="1 publisher phase")
    parser.add_argument(
        "--profile-phase",
        choices=PHASES,
        help="with BENCH_PROFILE=DIR, record each server with py-spy from this phase on",
    )
    parser.add_argument("--accounts", type=int, default=10, help="logins the sockets share")
    parser.add_argument("--variants", default="project,tutorial,bare")
    parser.add_argument("--baseline-ref", default="", help="also serve the project from REF")
    parser.add_argument(
        "--servers",
        default="",
        help="run every variant on each of these (comma list of daphne, runner, uvicorn;"
        " +deflate: clients offer permessage-deflate), e.g. runner,uvicorn,uvicorn+deflate",
    )
    args = parser.parse_args()
    harness.exit_on_sigterm()
    if args.quick:
        args.reps, args.messages, args.latency_messages, args.single_messages = 2, 30, 30, 5
        args.accounts = min(args.accounts, 4)
    harness.raise_nofile(8192)
    print(
        f"{args.subscribers} subscribers + {args.publishers} publishers in one room, window "
        f"{args.window}; {args.messages} / {args.latency_messages} / {args.single_messages} "
        f"messages per phase, {args.reps} repetitions",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fanout-")))
        log = stack.enter_context(open(tmp / "clients.log", "w+"))
        variants = start_variants(args, tmp, stack)
        try:
            measure(args, variants, log)
        except Exception:
            log.seek(0)
            print(f"--- client log ---\n{log.read()[-4000:]}", file=sys.stderr)
            raise
        summarize(variants)


if __name__ == "__main__":
    main()
