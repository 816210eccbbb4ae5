"""``mindspeed-rl-r3 apply [--undo]``: make an existing MindSpeed-RL installation load the patches by itself.

Writes one ``.pth`` file into a site-packages directory of the Python environment that runs MindSpeed-RL. Python
executes its ``import`` line at every interpreter start, which installs :mod:`mindspeed_rl_r3.autopatch`'s import
hook: a process that imports MindSpeed-RL (``python cli/train_grpo.py --config-name ...``, the Ray task running the
trainer, every Ray worker) patches each MindSpeed-RL module as it is imported, and only when the job's config has
``r3`` / ``aqn`` / ``lora_extras`` sections (the driver finds them in the hydra config and publishes them to the Ray
job, see :mod:`mindspeed_rl_r3.integration.settings`). Without them MindSpeed-RL runs exactly as before.

MindSpeed-RL is usually a checkout on ``PYTHONPATH`` rather than an installed package, so the file goes into the
site-packages of the running interpreter by default (``--site-dir`` picks another; every node of a cluster needs
its own ``apply``, or the package importable there, since jobs also pass the hook to Ray workers). If
``mindspeed_rl_r3`` itself is not importable from that environment, the file also adds its directory to
``sys.path``. ``apply`` is idempotent, ``apply --undo`` removes only a file this command wrote.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import site
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mindspeed_rl_r3 import __version__

PTH_NAME = "mindspeed_rl_r3_autopatch.pth"
MARKER = "# mindspeed_rl_r3 autopatch"
# One line: .pth files execute lines that start with "import"; a missing package must not break interpreter start.
HOOK_LINE = (
    "import importlib.util as _r3u; "
    "_r3u.find_spec('mindspeed_rl_r3') is not None and __import__('mindspeed_rl_r3.autopatch').autopatch.install()"
)


@dataclass
class ApplyReport:
    """What ``apply`` / ``apply --undo`` did. ``action``: installed, updated, unchanged, removed, absent, refused."""

    action: str
    site_dir: str
    pth_file: str
    lines: list[str] = field(default_factory=list)
    mindspeed_rl: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.action in ("installed", "updated", "removed")

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"changed": self.changed})

    def format(self) -> str:
        lines = [f"{self.action}: {self.pth_file}"]
        lines.append(f"  MindSpeed-RL: {self.mindspeed_rl or 'not importable from this interpreter'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def default_site_dir() -> Path:
    """The site-packages of the running interpreter (its purelib; the first of ``site.getsitepackages()``)."""
    purelib = sysconfig.get_paths().get("purelib")
    if purelib:
        return Path(purelib)
    return Path(site.getsitepackages()[0])


def _package_parent() -> Path:
    return Path(__file__).resolve().parent.parent


def _mindspeed_rl_location() -> str | None:
    spec = importlib.util.find_spec("mindspeed_rl")
    if spec is None:
        return None
    return str(Path(spec.origin).parent) if spec.origin else ", ".join(spec.submodule_search_locations or [])


def pth_lines(site_dir: Path) -> list[str]:
    """The ``.pth`` content for ``site_dir``: marker, optional path line, hook line."""
    lines = [f"{MARKER} {__version__}: written by `mindspeed-rl-r3 apply`; remove with `mindspeed-rl-r3 apply --undo`"]
    parent = _package_parent()
    if parent.resolve() != site_dir.resolve():
        lines.append(str(parent))  # makes mindspeed_rl_r3 importable where it is not installed into site_dir
    lines.append(HOOK_LINE)
    return lines


def apply_to_installation(site_dir: str | Path | None = None) -> ApplyReport:
    """Install (or refresh) the ``.pth`` hook; idempotent. Raises OSError naming the path when it cannot write."""
    directory = Path(site_dir) if site_dir is not None else default_site_dir()
    target = directory / PTH_NAME
    lines = pth_lines(directory)
    content = "\n".join(lines) + "\n"
    report = ApplyReport("installed", str(directory), str(target), lines, _mindspeed_rl_location())
    if not directory.is_dir():
        raise OSError(f"site directory {directory} does not exist")
    if target.exists():
        existing = target.read_text(encoding="utf-8")
        if not existing.startswith(MARKER):
            report.action = "refused"
            report.notes.append(f"{target} exists and was not written by mindspeed-rl-r3; left untouched")
            return report
        if existing == content:
            report.action = "unchanged"
            return report
        report.action = "updated"
    target.write_text(content, encoding="utf-8")
    if report.mindspeed_rl is None:
        report.notes.append("mindspeed_rl is not importable here: the hook waits until a process imports it")
    if str(directory) not in sys.path:
        report.notes.append(f"{directory} is not on this interpreter's sys.path: check it is the environment's")
    return report


def undo(site_dir: str | Path | None = None) -> ApplyReport:
    """Remove the ``.pth`` hook written by :func:`apply_to_installation` (idempotent)."""
    directory = Path(site_dir) if site_dir is not None else default_site_dir()
    target = directory / PTH_NAME
    report = ApplyReport("absent", str(directory), str(target), [], _mindspeed_rl_location())
    if not target.exists():
        return report
    existing = target.read_text(encoding="utf-8")
    if not existing.startswith(MARKER):
        report.action = "refused"
        report.notes.append(f"{target} was not written by mindspeed-rl-r3; left untouched")
        return report
    report.lines = existing.splitlines()
    target.unlink()
    report.action = "removed"
    report.notes.append("processes started before the removal keep their patches until they exit")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the CLI's ``apply`` subcommand (use with :func:`run_from_args`)."""
    parser.add_argument("--undo", action="store_true", help="remove the hook this command installed")
    parser.add_argument("--site-dir", help="site-packages directory (default: the running interpreter's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    return run_apply(undo_hook=args.undo, site_dir=args.site_dir, as_json=args.json)


def run_apply(undo_hook: bool = False, site_dir: str | None = None, as_json: bool = False) -> int:
    """What the CLI's ``apply`` runs. Exit codes: 0 done (changed or already so), 1 refused, 2 cannot write."""
    try:
        report = undo(site_dir) if undo_hook else apply_to_installation(site_dir)
    except OSError as err:
        print(f"apply: {err}", file=sys.stderr)
        return 2
    print(report.to_json() if as_json else report.format())
    return 1 if report.action == "refused" else 0
