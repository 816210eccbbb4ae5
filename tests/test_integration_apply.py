"""``mindspeed-rl-r3 apply`` on a temporary site directory: idempotent, reversible, leaves foreign files alone (what
the applied installation does with the real MindSpeed-RL: tests/upstream/test_apply.py)."""

import json
from pathlib import Path

from mindspeed_rl_r3.apply import MARKER, PTH_NAME, apply_to_installation, run_apply, undo

REPO = str(Path(__file__).resolve().parent.parent)


def test_apply_is_idempotent_reversible_and_reports(tmp_path):
    report = apply_to_installation(tmp_path)
    pth = tmp_path / PTH_NAME
    assert report.action == "installed" and report.changed and pth.read_text().startswith(MARKER)
    assert report.lines[-1].startswith("import ") and REPO in report.lines
    assert apply_to_installation(tmp_path).action == "unchanged"
    pth.write_text(pth.read_text().replace("0.1.0", "0.0.9"))
    assert apply_to_installation(tmp_path).action == "updated"
    removed = undo(tmp_path)
    assert removed.action == "removed" and not pth.exists()
    assert undo(tmp_path).action == "absent" and not undo(tmp_path).changed


def test_foreign_files_are_left_alone_and_exit_codes(tmp_path, capsys):
    (tmp_path / PTH_NAME).write_text("import something_else\n")
    assert apply_to_installation(tmp_path).action == "refused"
    assert undo(tmp_path).action == "refused" and (tmp_path / PTH_NAME).read_text() == "import something_else\n"
    assert run_apply(site_dir=str(tmp_path)) == 1
    (tmp_path / PTH_NAME).unlink()
    assert run_apply(site_dir=str(tmp_path), as_json=True) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["action"] == "installed"
    assert run_apply(undo_hook=True, site_dir=str(tmp_path)) == 0
    assert run_apply(site_dir=str(tmp_path / "missing")) == 2
