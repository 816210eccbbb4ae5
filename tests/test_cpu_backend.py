"""The CPU backend's stand-ins: what they answer, and that they refuse to exist next to a real torch_npu.

Each case runs in a fresh interpreter: installing the backend changes process-wide state (``torch.npu``, tensor
factories), which the rest of this test session must not see."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _run(code: str, *, path: Path | None = None) -> subprocess.CompletedProcess:
    env_path = [str(path)] if path is not None else []
    prelude = f"import sys; sys.path[:0] = {env_path!r}\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_refuses_when_a_real_torch_npu_is_importable(tmp_path):
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("raise RuntimeError('a real torch_npu would load CANN here')\n")
    done = _run(
        """
        from mindspeed_rl_r3.patches import cpu_backend
        try:
            cpu_backend.install()
        except cpu_backend.CpuBackendError as err:
            print("refused:", err)
        print("installed" if cpu_backend.installed() else "not installed")
        print("torch.npu" in sys.modules)
        """,
        path=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "refused: " in done.stdout and "real torch_npu is importable" in done.stdout
    assert done.stdout.splitlines()[-2:] == ["not installed", "False"]


def test_the_cpu_flag_at_interpreter_start_is_refused_on_an_npu_machine_and_the_patches_still_load(tmp_path):
    """``MINDSPEED_RL_R3_CPU_BACKEND=1`` left set on an NPU machine after ``mindspeed-rl-r3 apply``: the backend
    refuses, loudly, and the import hook that patches MindSpeed-RL is installed all the same."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("raise RuntimeError('a real torch_npu would load CANN here')\n")
    done = _run(
        """
        import os
        os.environ["MINDSPEED_RL_R3_CPU_BACKEND"] = "1"
        from mindspeed_rl_r3 import autopatch
        from mindspeed_rl_r3.patches import cpu_backend
        try:
            autopatch.install()
        except cpu_backend.CpuBackendError as err:
            print("refused:", err)
        print(autopatch.installed(), cpu_backend.installed(), "MINDSPEED_RL_R3_CPU_BACKEND" in os.environ)
        """,
        path=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "refused: " in done.stdout and "real torch_npu is importable" in done.stdout
    assert done.stdout.splitlines()[-1] == "True False False"


def test_standins_answer_imports_and_decorators_without_filling_sys_modules():
    done = _run(
        """
        import torch
        from mindspeed_rl_r3.patches import cpu_backend
        cpu_backend.install()
        import torch_npu
        from torch_npu.contrib import transfer_to_npu
        import torchair
        @torchair.register_fx_node_ge_converter(torch.ops.aten.add)
        def convert(x):
            return x
        assert convert(3) == 3, "a stand-in decorator must return the function unchanged"
        before = set(sys.modules)
        torch_npu.npu.some.deep.attribute
        assert set(sys.modules) == before, "attribute children must stay off sys.modules"
        assert not torch_npu.npu.some_flag and cpu_backend.is_standin(transfer_to_npu)
        assert torch.npu.current_device() == 0 and torch.zeros(2, device="npu").device.type == "cpu"
        x = torch.ones(3)
        assert x.npu() is x and x.cuda() is x
        assert torch_npu.npu_swiglu(torch.ones(1, 4)).shape == (1, 2)  # a CPU form of a device op
        cpu_backend.uninstall()
        assert "torch_npu" not in sys.modules and not cpu_backend.is_standin(getattr(torch, "npu", None))
        try:
            torch.zeros(1, device="npu")
        except RuntimeError:
            print("factories restored")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "factories restored" in done.stdout


@pytest.mark.parametrize("name", ["torch_npu", "torchair.ge", "acl.rt"])
def test_standins_pickle_by_name(name):
    """Ray pickles remote functions by value; a stand-in in their globals must arrive as the receiver's stand-in."""
    done = _run(
        f"""
        import importlib, pickle
        from mindspeed_rl_r3.patches import cpu_backend
        cpu_backend.install()
        module = importlib.import_module({name!r}.split(".")[0])
        for part in {name!r}.split(".")[1:]:
            module = getattr(module, part)
        assert pickle.loads(pickle.dumps(module)) is module
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
