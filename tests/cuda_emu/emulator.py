"""Build CUDA sources of csrc/cuda into a CPU extension that runs their kernels under cuda_emu (README.md here).

``translate`` rewrites the two pieces of CUDA syntax that are not C++ (``kernel<<<config>>>(args)`` launches and
``__shared__`` declarations) into calls to the emulator; everything else compiles as host C++ against the stub
headers in ``include/``. ``load`` translates the given sources and builds them with a harness that binds the
functions under test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"

_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(?P<config>.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w:\s]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w:]+)\s+(?P<name>\w+)(?P<dims>(?:\s*\[[^\]]+\])*)\s*;")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside (), [] and {}."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _closing_paren(text: str, open_index: int) -> int:
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses in a kernel launch")


def translate(source: str) -> str:
    """CUDA source -> host C++ for cuda_emu (launches and shared-memory declarations rewritten)."""
    out, pos = [], 0
    for match in _LAUNCH.finditer(source):
        if match.start() < pos:
            continue
        config = _split_top_level(match.group("config"))
        if not 2 <= len(config) <= 4:
            raise ValueError(f"kernel launch with {len(config)} configuration values: {match.group(0)!r}")
        config += ["0", "nullptr"][len(config) - 2:]
        close = _closing_paren(source, match.end() - 1)
        args = source[match.end():close].strip()
        call = f"::cuda_emu::launch({', '.join(config)}, {match.group('kernel')}{', ' + args if args else ''})"
        out.append(source[pos:match.start()] + call)
        pos = close + 1
    text = "".join(out) + source[pos:]
    text = _EXTERN_SHARED.sub(lambda m: f"{m.group('type')}* {m.group('name')} = ::cuda_emu::dynamic_smem<{m.group('type')}>();", text)
    counter = iter(range(1 << 30))
    text = _STATIC_SHARED.sub(
        lambda m: f"auto& {m.group('name')} = ::cuda_emu::static_smem<{m.group('type')}{m.group('dims')}, {next(counter)}>();",
        text)
    if "__shared__" in text or "<<<" in text:
        raise ValueError("cuda_emu: CUDA syntax left untranslated")
    return text


def load(name: str, cuda_sources: list[str], harness: Path, verbose: bool = False):
    """Translate ``cuda_sources`` (paths relative to csrc/cuda) and build them with ``harness`` (a .cpp that
    includes them by their translated names, ``<stem>.emu.cpp``) into an extension module."""
    from torch.utils import cpp_extension

    build = Path(os.environ.get("CUDA_EMU_BUILD_DIR", REPO / "build" / "cuda_emu")) / name
    build.mkdir(parents=True, exist_ok=True)
    for source in cuda_sources:
        # Rewritten only when it changed: a new mtime alone makes ninja rebuild (~35 s); ninja's header
        # dependencies rebuild whenever a source, a stub header or the harness changes.
        target, text = build / (Path(source).stem + ".emu.cpp"), translate((CSRC / "cuda" / source).read_text())
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    return cpp_extension.load(
        name=name,
        sources=[str(harness)],
        extra_include_paths=[str(HERE / "include"), str(build), str(CSRC / "cuda"), str(CSRC)],
        extra_cflags=["-O2", "-std=c++17", "-DCUDA_EMU", "-Wno-unknown-pragmas"],
        build_directory=str(build),
        verbose=verbose,
    )
