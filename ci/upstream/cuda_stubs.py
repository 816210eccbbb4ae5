"""Link-time stand-ins for the large CUDA libraries that the registry's torch 2.8.0 (a CUDA build) links against.

The upstream test environment needs torch 2.8.0 (vLLM 0.11.0's CPU extension is built against it) and the registry
serves only its CUDA build. Its ``libtorch_cuda.so`` names about 2.8 GB of NVIDIA libraries that a CPU machine never
calls: the real CUDA runtime reports no device, so torch takes its CPU paths. For each such library this writes a
tiny shared object exporting the symbols torch references, so the dynamic linker is satisfied and nothing else.
Symbols are read from torch's own ELF files (``readelf``), so a different torch build gets matching stand-ins.

usage: python cuda_stubs.py SITE_PACKAGES      (needs gcc and readelf)
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

# soname -> (folder under site-packages/nvidia that torch's RPATH searches, prefix of its unversioned symbols)
LIBRARIES = {
    "libcublas.so.12": ("cublas", re.compile(r"cublas(?!Lt)")),
    "libcublasLt.so.12": ("cublas", re.compile(r"cublasLt")),
    "libcudnn.so.9": ("cudnn", re.compile(r"cudnn")),
    "libcufft.so.11": ("cufft", re.compile(r"cufft")),
    "libcurand.so.10": ("curand", re.compile(r"curand")),
    "libcusparse.so.12": ("cusparse", re.compile(r"cusparse(?!Lt)")),
    "libcusparseLt.so.0": ("cusparselt", re.compile(r"cusparseLt")),
    "libcusolver.so.11": ("cusolver", re.compile(r"cusolver")),
    "libnccl.so.2": ("nccl", re.compile(r"p?nccl")),
    "libnvrtc.so.12": ("cuda_nvrtc", re.compile(r"nvrtc")),
    "libnvJitLink.so.12": ("nvjitlink", re.compile(r"nvJitLink")),
}


def undefined_symbols(lib_dir: Path) -> dict[str, dict[str, str]]:
    """soname -> {symbol: ELF type} for every undefined dynamic symbol of torch's libraries that a stub must export."""
    wanted: dict[str, dict[str, str]] = {}
    for lib in sorted(lib_dir.glob("*.so*")):
        out = subprocess.run(["readelf", "--dyn-syms", "-W", str(lib)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 8 or fields[6] != "UND":
                continue
            symbol, _, version = fields[7].partition("@")
            version = version.split(" ")[0]
            for soname, (_, prefix) in LIBRARIES.items():
                if version == soname or (not version and prefix.match(symbol)):
                    wanted.setdefault(soname, {})[symbol] = fields[3]
    return wanted


def build_stub(soname: str, symbols: dict[str, str], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source, script = Path(tmp, "stub.c"), Path(tmp, "stub.map")
        lines = ["int cuda_stub_marker;"]
        lines += [f"int {s};" if kind == "OBJECT" else f"int {s}(void) {{ return 1; }}" for s, kind in symbols.items()]
        source.write_text("\n".join(lines) + "\n")
        exported = " ".join(f"{s};" for s in sorted(symbols)) or "cuda_stub_marker;"
        script.write_text(f"{soname} {{ global: {exported} local: *; }};\n")
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-w", "-o", str(out_dir / soname), str(source),
             f"-Wl,-soname,{soname}", f"-Wl,--version-script={script}"],
            check=True,
        )  # fmt: skip


def main(site_packages: str) -> None:
    root = Path(site_packages)
    wanted = undefined_symbols(root / "torch" / "lib")
    for soname, (folder, _) in LIBRARIES.items():
        symbols = wanted.get(soname, {})
        build_stub(soname, symbols, root / "nvidia" / folder / "lib")
        print(f"cuda stub {soname}: {len(symbols)} symbols")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
