"""``mindspeed-rl-r3``: the package's command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mindspeed_rl_r3 import __version__

# Targets from the routing foundation issue: (metric, comparison, bound).
ROUTING_TARGETS = (
    ("bytes_per_token", "<=", 384.0),
    ("bytes_per_token_dedupe", "<=", 0.85 * 384.0),
    ("layout_speedup_vs_naive", ">=", 10.0),
    ("layout_gb_per_s", ">=", 1.0),
)


def _bench_routing(args: argparse.Namespace) -> int:
    from mindspeed_rl_r3.bench.routing import RoutingBenchConfig, run_routing_bench

    cfg = RoutingBenchConfig(repeats=args.repeats, seed=args.seed)
    progress = None if args.json else (lambda msg: print(f"[bench routing] {msg}...", file=sys.stderr))
    result = run_routing_bench(cfg, progress=progress)
    result["targets"] = {
        name: {"bound": f"{op} {bound:g}", "met": result[name] <= bound if op == "<=" else result[name] >= bound}
        for name, op, bound in ROUTING_TARGETS
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"routing payload, {result['model']['name']} ({result['batch_sequences']} sequences, "
        f"{result['batch_tokens']} tokens, {result['payload_mb']} MB of ids, 1 thread)"
    )
    for name, target in result["targets"].items():
        print(f"  {name:<26} {result[name]:>10}   target {target['bound']:<10} {'ok' if target['met'] else 'MISSED'}")
    print(f"  {'int32_bytes_per_token':<26} {result['int32_bytes_per_token']:>10}   (naive int32 payload)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindspeed-rl-r3", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="measure speed and size against a baseline in the same run")
    suites = bench.add_subparsers(dest="suite", required=True)
    routing = suites.add_parser("routing", help="wire size per token and encode -> decode -> layout throughput")
    routing.add_argument("--json", action="store_true", help="print one JSON object")
    routing.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is reported)")
    routing.add_argument("--seed", type=int, default=0)
    routing.set_defaults(run=_bench_routing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
