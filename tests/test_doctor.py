"""`doctor`: versions and patch-target checks on the pinned upstream checkouts (``../shared/upstream``, parsed), on
hand-written upstream sources, and without importing torch_npu. The import mode against the real modules runs in
tests/upstream/test_doctor_real.py."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from importlib import import_module
from pathlib import Path

import pytest

from mindspeed_rl_r3 import doctor
from mindspeed_rl_r3.doctor import SourceIndex, check_target_in_source, format_doctor, package_version, run_doctor
from mindspeed_rl_r3.doctoring import versions as doctor_versions
from mindspeed_rl_r3.patches import PATCH_MODULES
from mindspeed_rl_r3.patches.targets import PatchTarget

VLLM_TARGETS = (
    "vllm_ascend.ops.common_fused_moe.select_experts",
    "vllm_ascend.ops.common_fused_moe.AscendFusedMoE.forward_impl",
    "vllm_ascend.worker.model_runner_v1.NPUModelRunner.execute_model",
    "vllm_ascend.worker.model_runner_v1.NPUModelRunner.capture_model",
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

                    def capture_model(self):
                        raise NotImplementedError

                Base = _RunnerBase

                class NPUModelRunner(Base):
                    pass
            """,
        },
    )


def _upstream(folder: str = "") -> Path:
    from mindspeed_rl_r3.patches import cpu_backend

    root = cpu_backend.upstream_root()
    if root is None:
        pytest.skip("../shared/upstream (the pinned upstream sources) is absent")
    return root / folder if folder else root


def _upstream_dirs() -> list[Path]:
    return [p for p in sorted(_upstream().iterdir()) if p.is_dir()]


@pytest.fixture(scope="module")
def upstream_report():
    """One full doctor run (all patch modules) on the pinned upstream checkouts, parsed, never imported."""
    return run_doctor(_upstream_dirs(), quiet=True)


@pytest.mark.upstream
def test_pinned_upstream_is_compatible(upstream_report):
    report = upstream_report
    names = {t["name"] for t in report["targets"]}
    assert set(VLLM_TARGETS) <= names
    assert {t["module"] for t in report["targets"]} == set(PATCH_MODULES)
    keys = {"name", "found", "compatible", "version_known", "detail", "source", "module", "required", "kind"}
    declared = {t.path for name in PATCH_MODULES for t in import_module(f"mindspeed_rl_r3.patches.{name}").TARGETS}
    checked = {t["name"] for t in report["targets"] if t["kind"] == "target"}
    assert checked <= declared and {n for n in declared - checked if not n.startswith("megatron.")} == set()
    assert "mindspeed_rl.workers.reference_worker.ReferenceWorkerBase.compute_ref_log_prob" in declared
    assert "vllm.model_executor.layers.fused_moe.layer.FusedMoE.forward_impl" in declared  # vllm_capture counts
    upstream = str(_upstream().resolve())
    # vLLM itself is no upstream checkout: its targets are found only where vLLM is installed (.venv-upstream)
    vllm_missing = {t.path for t in import_module("mindspeed_rl_r3.patches.vllm_capture").TARGETS}
    vllm_missing = vllm_missing if report["versions"]["vllm"] is None else set()
    for target in report["targets"]:
        assert keys <= set(target) and target["kind"] == "target"
        if target["name"] in vllm_missing:
            assert not target["found"] and not target["required"], target
            continue
        assert target["found"] and target["compatible"], target
        if target["name"].split(".")[0] in ("mindspeed_rl", "mindspeed", "mindspeed_llm", "vllm_ascend"):
            assert target["source"].startswith(f"upstream:{upstream}/"), target
            # the COMMIT files of the pinned trees match the commits the patches were written against, except
            # vllm-ascend's targets, which name its release (the source tree carries no version file)
            assert target["version_known"] == (not target["name"].startswith("vllm_ascend.")), target
    commits = {Path(u["dir"]).name: u["commit"][:8] for u in report["upstream"]}
    assert commits["MindSpeed-RL"] == "05a90d77" and commits["MindSpeed"] == "ac9f0e74"
    assert report["ok"] and report["profile"] == "npu" and report["diagnostics_failed"] == []
    assert report["missing_required"] == [] and report["incompatible"] == []
    assert set(report["missing_optional"]) == vllm_missing
    assert json.loads(json.dumps(report))["ok"] is True


@pytest.mark.upstream
def test_versions(upstream_report):
    versions = upstream_report["versions"]
    assert set(versions) == {
        "torch", "torch_npu", "vllm", "vllm_ascend", "megatron", "mindspeed", "mindspeed_llm", "mindspeed_rl", "ray",
        "hydra",
    }  # fmt: skip
    assert versions["torch"] and versions["megatron"]
    assert versions["torch_npu"] is None or isinstance(versions["torch_npu"], str)
    assert package_version("hydra") in (None, versions["hydra"])


@pytest.mark.upstream
def test_report_printing(upstream_report, capsys):
    text = format_doctor(upstream_report)
    assert "doctor ok" in text and "vllm_ascend_capture" in text and "torch_npu" in text
    assert "05a90d77cb6cfad8999e2aee21068284db959579" in text  # the MindSpeed-RL checkout's recorded commit
    # the summary: one line per patch module with its counts, no per-target lines for targets that are fine
    assert "\n  mindspeed_rl_worker" in text and f"{len(PATCH_MODULES)} " not in text.splitlines()[0]
    assert "compute_ref_log_prob" not in text and "[ok]" not in text
    verbose = format_doctor(upstream_report, verbose=True)
    assert "[ok] mindspeed_rl.workers.reference_worker.ReferenceWorkerBase.compute_ref_log_prob" in verbose
    assert len(verbose.splitlines()) > len(upstream_report["targets"]) > 2 * len(text.splitlines())
    assert "doctor ok" in verbose and "05a90d77cb6cfad8999e2aee21068284db959579" in verbose
    out = io.StringIO()
    run_doctor([_upstream("vllm-ascend")], as_json=True, modules=["vllm_ascend_capture"], stream=out)
    assert json.loads(out.getvalue())["ok"] is True
    assert capsys.readouterr().out == ""  # stream= keeps stdout clean


@pytest.mark.upstream
def test_cli_doctor_on_the_pinned_upstream(capsys):
    from mindspeed_rl_r3.cli.main import main

    args = ["doctor", "--json"]
    for directory in _upstream_dirs():
        args += ["--upstream", str(directory)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["upstream"]) == len(_upstream_dirs())


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
    summary = format_doctor(report)
    # problems only: the incompatible targets with their details; the compatible one is only counted
    assert "experts_selector.py:2" in summary and VLLM_TARGETS[1] not in summary
    assert "vllm_ascend_capture" in summary and "2 INCOMPATIBLE" in summary
    out = io.StringIO()
    run_doctor([upstream / "vllm_ascend"], as_json=True, modules=["vllm_ascend_capture"], stream=out)
    printed = json.loads(out.getvalue())
    assert {t["name"] for t in printed["targets"]} == {VLLM_TARGETS[0], VLLM_TARGETS[2]}
    assert printed["modules"]["vllm_ascend_capture"]["INCOMPATIBLE"] == 2
    out = io.StringIO()
    run_doctor([upstream / "vllm_ascend"], as_json=True, modules=["vllm_ascend_capture"], stream=out, verbose=True)
    assert VLLM_TARGETS[1] in {t["name"] for t in json.loads(out.getvalue())["targets"]}


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


@pytest.mark.upstream
def test_no_torch_npu_import_without_ascend_runtime(tmp_path, monkeypatch):
    """torch_npu installed but no CANN: targets are read from the installed source, torch_npu is never imported."""
    site = _write(
        tmp_path / "site", {"torch_npu/__init__.py": "raise RuntimeError('torch_npu must not be imported')\n"}
    )
    for folder in ("vllm-ascend", "MindSpeed-LLM", "MindSpeed"):  # the real sources, found but never imported
        monkeypatch.syspath_prepend(str(_upstream(folder)))
    monkeypatch.syspath_prepend(str(site))
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(doctor_versions, "ASCEND_DIRS", ())
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert not doctor.import_is_safe("vllm_ascend") and doctor.import_is_safe("megatron")
    report = run_doctor(modules=["vllm_ascend_capture", "mindspeed_llm_router"], quiet=True)
    assert "torch_npu" not in sys.modules and "vllm_ascend" not in sys.modules
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
    (checkout / "COMMIT").write_text("ffff0000\n")  # a source export records its commit in COMMIT
    assert run_doctor([checkout], modules=["mindspeed_llm_router"], quiet=True)["upstream"][0]["commit"] == "ffff0000"


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="upstream directory not found"):
        run_doctor([tmp_path / "missing"], quiet=True)
    with pytest.raises(ValueError, match="unknown patch modules"):
        run_doctor(modules=["nope"], quiet=True)
    with pytest.raises(ValueError, match="profile"):
        run_doctor(profile="gpu", quiet=True)


# ------------------------------------------------------------------------------------- real upstream checkouts


@pytest.mark.upstream
def test_real_vllm_ascend_checkout():
    src = _upstream("vllm-ascend")
    report = run_doctor([src], modules=["vllm_ascend_capture"], quiet=True)
    for target in report["targets"]:
        # every target was judged from that checkout: found there, or reported missing with the reason
        assert (target["source"] or "").startswith(f"upstream:{src.resolve()}") or not target["found"], target
        assert target["found"] or target["detail"]
    if (src / "vllm_ascend" / "ops" / "common_fused_moe.py").is_file():  # the v0.11.0-dev layout
        assert report["ok"], report["targets"]


@pytest.mark.upstream
def test_real_mindspeed_rl_checkout():
    src = _upstream("MindSpeed-RL")
    report = run_doctor([src], quiet=True)
    assert report["upstream"][0]["dir"] == str(src.resolve())
    if (src / "megatron" / "core" / "transformer" / "moe" / "router.py").is_file():  # megatron copied in
        megatron = [t for t in report["targets"] if t["module"] == "megatron_router"]
        assert all(t["source"].startswith("upstream:") and t["compatible"] for t in megatron), megatron
    for target in report["targets"]:
        if target["name"].startswith("mindspeed_rl."):  # MindSpeed-RL's own targets come from the checkout
            assert target["found"] and target["source"].startswith("upstream:"), target
