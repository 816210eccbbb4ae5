"""`doctor`: versions and patch-target checks on a fake installation, on hand-written upstream sources, without
importing torch_npu, and (when MINDSPEED_RL_SRC / VLLM_ASCEND_SRC are set) on real checkouts."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
from importlib import import_module
from pathlib import Path

import pytest

from mindspeed_rl_r3 import doctor
from mindspeed_rl_r3.doctor import SourceIndex, check_target_in_source, format_doctor, package_version, run_doctor
from mindspeed_rl_r3.patches import PATCH_MODULES
from mindspeed_rl_r3.patches.targets import PatchTarget

FAKES = str(Path(__file__).parent / "fakes")
VLLM_TARGETS = (
    "vllm_ascend.ops.common_fused_moe.select_experts",
    "vllm_ascend.ops.common_fused_moe.AscendFusedMoE.forward_impl",
    "vllm_ascend.worker.model_runner_v1.NPUModelRunner.execute_model",
)


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def _vllm_ascend_source(root: Path, *, good: bool) -> Path:
    """A vllm-ascend 0.11.0-shaped tree: select_experts re-exported from a submodule, execute_model inherited."""
    select = "hidden_states, router_logits, top_k" if good else "router_logits, hidden_states, top_k"
    runner = "self, scheduler_output, intermediate_tensors=None" if good else "self, batch"
    return _write(
        root,
        {
            "vllm_ascend/__init__.py": "",
            "vllm_ascend/_version.py": "__version__ = version = '0.11.0'\n",
            "vllm_ascend/ops/__init__.py": "",
            "vllm_ascend/ops/moe/__init__.py": "",
            "vllm_ascend/ops/moe/experts_selector.py": f"""
                def select_experts({select}, use_grouped_topk, renormalize, topk_group=None, **kwargs):
                    raise NotImplementedError
            """,
            "vllm_ascend/ops/common_fused_moe.py": """
                from vllm.model_executor.layers.fused_moe.layer import FusedMoE
                from .moe.experts_selector import select_experts

                class AscendFusedMoE(FusedMoE):
                    def forward_impl(self, hidden_states, router_logits):
                        return select_experts(hidden_states, router_logits, 8, False, True)
            """,
            "vllm_ascend/worker/__init__.py": "",
            "vllm_ascend/worker/model_runner_v1.py": f"""
                try:
                    import torch_npu
                except ImportError:
                    torch_npu = None

                class _RunnerBase:
                    def execute_model({runner}):
                        raise NotImplementedError

                Base = _RunnerBase

                class NPUModelRunner(Base):
                    pass
            """,
        },
    )


@pytest.fixture(scope="module")
def fake_report():
    """One full doctor run on the fakes of vllm-ascend / MindSpeed / MindSpeed-LLM (all patch modules)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(FAKES)
        yield run_doctor(profile="npu", quiet=True)


def test_fake_installation_is_compatible(fake_report):
    names = {t["name"] for t in fake_report["targets"]}
    assert set(VLLM_TARGETS) <= names
    assert {t["module"] for t in fake_report["targets"]} == set(PATCH_MODULES)
    keys = {"name", "found", "compatible", "version_known", "detail", "source", "module", "required", "kind"}
    for target in fake_report["targets"]:
        assert keys <= set(target)
        if target["kind"] == "target":
            assert target["found"] and target["compatible"], target
    declared = {t.path for name in PATCH_MODULES for t in import_module(f"mindspeed_rl_r3.patches.{name}").TARGETS}
    checked = {t["name"] for t in fake_report["targets"] if t["kind"] == "target"}
    assert checked <= declared and all(
        t["kind"] == "diagnostic" for t in fake_report["targets"] if t["name"] not in declared
    )
    assert fake_report["ok"] and fake_report["profile"] == "npu"
    assert fake_report["missing_required"] == [] and fake_report["incompatible"] == []
    assert json.loads(json.dumps(fake_report))["ok"] is True


def test_versions(fake_report):
    versions = fake_report["versions"]
    assert set(versions) == {
        "torch", "torch_npu", "vllm", "vllm_ascend", "megatron", "mindspeed", "mindspeed_llm", "mindspeed_rl", "ray",
        "hydra",
    }  # fmt: skip
    assert versions["torch"] and versions["vllm_ascend"] == "unknown"  # the fake has no metadata and no version
    assert versions["torch_npu"] is None or isinstance(versions["torch_npu"], str)
    assert package_version("hydra") in (None, versions["hydra"])


def test_report_printing(fake_report, capsys):
    text = format_doctor(fake_report)
    assert "doctor ok" in text and "vllm_ascend_capture" in text and "torch_npu" in text
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(FAKES)
        out = io.StringIO()
        run_doctor(as_json=True, profile="npu", modules=["vllm_ascend_capture"], stream=out)
    assert json.loads(out.getvalue())["ok"] is True
    assert capsys.readouterr().out == ""  # stream= keeps stdout clean


def test_upstream_source_with_right_signatures(tmp_path):
    upstream = _vllm_ascend_source(tmp_path / "vllm-ascend", good=True)
    report = run_doctor([upstream], modules=["vllm_ascend_capture"], quiet=True)
    assert report["profile"] == "npu" and report["ok"], report["targets"]
    by_name = {t["name"]: t for t in report["targets"]}
    select = by_name[VLLM_TARGETS[0]]
    # the re-export is followed to the defining file, and the source version is matched
    assert select["source"].startswith("upstream:") and select["source"].endswith("ops/moe/experts_selector.py")
    assert select["version_known"] and select["installed"] == "0.11.0"
    runner = by_name[VLLM_TARGETS[2]]
    assert runner["found"] and runner["compatible"] and runner["source"].endswith("model_runner_v1.py")


def test_upstream_source_with_wrong_signatures(tmp_path):
    upstream = _vllm_ascend_source(tmp_path / "vllm-ascend", good=False)
    report = run_doctor([upstream / "vllm_ascend"], modules=["vllm_ascend_capture"], quiet=True)  # the package dir
    assert not report["ok"]
    by_name = {t["name"]: t for t in report["targets"]}
    assert set(report["incompatible"]) == {VLLM_TARGETS[0], VLLM_TARGETS[2]}
    assert "expected parameters ('hidden_states', 'router_logits'" in by_name[VLLM_TARGETS[0]]["detail"]
    assert "found ('router_logits', 'hidden_states'" in by_name[VLLM_TARGETS[0]]["detail"]
    assert "experts_selector.py:2" in by_name[VLLM_TARGETS[0]]["detail"]
    assert "('self', 'batch')" in by_name[VLLM_TARGETS[2]]["detail"]
    assert by_name[VLLM_TARGETS[1]]["compatible"]
    assert "INCOMPATIBLE" in format_doctor(report) and "doctor FAILED" in format_doctor(report)


def test_missing_targets_in_upstream(tmp_path):
    upstream = _write(
        tmp_path / "vllm-ascend-main",
        {"vllm_ascend/__init__.py": "", "vllm_ascend/ops/__init__.py": "", "vllm_ascend/worker/__init__.py": ""},
    )
    report = run_doctor([upstream], modules=["vllm_ascend_capture"], quiet=True)
    assert not report["ok"] and set(report["missing_required"]) == set(VLLM_TARGETS)
    assert all("not defined" in t["detail"] or "no module" in t["detail"] for t in report["targets"])
    # a CPU profile does not require vllm-ascend: reported, not failing
    cpu = run_doctor([upstream], modules=["vllm_ascend_capture"], profile="cpu", quiet=True)
    assert cpu["ok"] and set(cpu["missing_optional"]) == set(VLLM_TARGETS)


def test_source_index_details(tmp_path):
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.impl import Manager as Alias\n",
            "pkg/impl.py": """
                class Manager:
                    @staticmethod
                    def register(name, func=None):
                        pass

                    @classmethod
                    def build(cls, size):
                        pass

                    class Inner:
                        def run(self, x):
                            pass

                    def __init__(self, a, b=1):
                        pass

                value = compute()
            """,
        },
    )
    index = SourceIndex([root])

    def params(path: str) -> str:
        return check_target_in_source(PatchTarget(path, ("1",), ()), index)["detail"]

    def check(path: str, parameters: tuple[str, ...]) -> dict:
        return check_target_in_source(PatchTarget(path, ("1",), parameters), index)

    assert check("pkg.Alias.register", ("name", "func"))["compatible"]  # alias import, staticmethod
    assert check("pkg.impl.Manager.build", ("size",))["compatible"]  # classmethod drops cls
    assert check("pkg.impl.Manager.Inner.run", ("self", "x"))["compatible"]
    assert check("pkg.impl.Manager", ("a", "b"))["compatible"]  # a class: __init__ without self
    assert not check("pkg.impl.Manager.missing", ())["found"]
    assert "cannot read its signature" in params("pkg.impl.value")
    assert "no module" in params("other.thing")


def test_no_torch_npu_import_without_ascend_runtime(tmp_path, monkeypatch):
    """torch_npu installed but no CANN: targets are read from the installed source, torch_npu is never imported."""
    site = _write(
        tmp_path / "site", {"torch_npu/__init__.py": "raise RuntimeError('torch_npu must not be imported')\n"}
    )
    monkeypatch.syspath_prepend(FAKES)
    monkeypatch.syspath_prepend(str(site))
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(doctor, "_ASCEND_DIRS", ())
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert not doctor.import_is_safe("vllm_ascend") and doctor.import_is_safe("megatron")
    report = run_doctor(modules=["vllm_ascend_capture", "mindspeed_llm_router"], quiet=True)
    assert "torch_npu" not in sys.modules
    assert report["profile"] == "npu" and report["versions"]["torch_npu"] == "unknown"
    for target in report["targets"]:
        assert target["found"] and target["compatible"], target
        assert target["source"].startswith("installed-source:"), target
    assert report["ok"]


def test_git_commit_marks_versions_known(tmp_path):
    checkout = _write(
        tmp_path / "MindSpeed-LLM",
        {
            "mindspeed_llm/__init__.py": "",
            "mindspeed_llm/core/__init__.py": "",
            "mindspeed_llm/core/transformer/__init__.py": "",
            "mindspeed_llm/core/transformer/moe/__init__.py": "",
            "mindspeed_llm/core/transformer/moe/router.py": "def topk_router_routing(self, logits):\n    pass\n",
            ".git/HEAD": "ref: refs/heads/2.3.0\n",
            ".git/packed-refs": "# pack-refs\na2c0733b9c86aaaa0000000000000000deadbeef refs/heads/2.3.0\n",
        },
    )
    report = run_doctor([checkout], modules=["mindspeed_llm_router"], quiet=True)
    assert report["upstream"][0]["commit"].startswith("a2c0733")
    routing = next(t for t in report["targets"] if t["name"].endswith("topk_router_routing"))
    assert routing["found"] and routing["compatible"] and routing["version_known"]
    assert routing["source"].startswith("upstream:")


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="upstream directory not found"):
        run_doctor([tmp_path / "missing"], quiet=True)
    with pytest.raises(ValueError, match="unknown patch modules"):
        run_doctor(modules=["nope"], quiet=True)
    with pytest.raises(ValueError, match="profile"):
        run_doctor(profile="gpu", quiet=True)


# ------------------------------------------------------------------------------------- real upstream checkouts


def _env_dir(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"set {var} to an upstream checkout")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"{var}={value} is not a directory")
    return path


def test_real_vllm_ascend_checkout():
    src = _env_dir("VLLM_ASCEND_SRC")
    report = run_doctor([src], modules=["vllm_ascend_capture"], quiet=True)
    for target in report["targets"]:
        # every target was judged from that checkout: found there, or reported missing with the reason
        assert (target["source"] or "").startswith(f"upstream:{src.resolve()}") or not target["found"], target
        assert target["found"] or target["detail"]
    if (src / "vllm_ascend" / "ops" / "common_fused_moe.py").is_file():  # the v0.11.0-dev layout
        assert report["ok"], report["targets"]


def test_real_mindspeed_rl_checkout():
    src = _env_dir("MINDSPEED_RL_SRC")
    report = run_doctor([src], quiet=True)
    assert report["upstream"][0]["dir"] == str(src.resolve())
    if (src / "megatron" / "core" / "transformer" / "moe" / "router.py").is_file():  # megatron copied in
        megatron = [t for t in report["targets"] if t["module"] == "megatron_router"]
        assert all(t["source"].startswith("upstream:") and t["compatible"] for t in megatron), megatron
    for target in report["targets"]:
        if target["name"].startswith("mindspeed_rl."):  # MindSpeed-RL's own targets come from the checkout
            assert target["found"] and target["source"].startswith("upstream:"), target
