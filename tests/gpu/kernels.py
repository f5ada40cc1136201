"""Compile every fused routing kernel for NVIDIA GPUs on the CPU, and report what each needs and allows.

Triton's own compiler builds each kernel launch the layers make (capsdist/model/fused_votes.py) for sm_80 and
sm_90, and its ptxas reports registers, spills and shared memory; from those follows the occupancy: programs
and warps per SM. No GPU is needed; Triton's interpreter must be off (TRITON_INTERPRET unset).

    python tests/gpu/kernels.py               # markdown table (docs/benchmarks.md) at fused_votes.GPU_BLOCKS
    python tests/gpu/kernels.py --json        # one JSON line per kernel, specialisation and arch
    python tests/gpu/kernels.py --candidates  # the tiles tried for GPU_BLOCKS, worst case of each kernel

The launches are those of routing calls of the capsule presets (capsnet.PRESETS) on every dataset's classes,
with and without coordinate addition: moments without E-step terms (the first M-step) and with them, lse, and
the backward of each (LSE true for lse's). Each one is compiled once per constexpr set (the kernels do not
specialise on the sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: the kernels must be JIT functions

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from capsdist.data.sources import DATASETS  # noqa: E402
from capsdist.model import fused_kernels, fused_votes  # noqa: E402
from capsdist.model.capsnet import PRESETS  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arch:
    """What one SM holds (CUDA occupancy calculator, compute capabilities 8.0 and 9.0)."""

    capability: int
    shared_per_sm: int  # bytes, the largest carve-out
    registers_per_sm: int = 65536
    warps_per_sm: int = 64
    programs_per_sm: int = 32
    register_unit: int = 256  # registers are allocated per warp in units of this
    shared_reserved: int = 1024  # bytes the system takes per program


ARCHS = (Arch(80, 164 * 1024), Arch(90, 228 * 1024))
KERNELS = {"moments": fused_kernels.moments_kernel, "lse": fused_kernels.lse_kernel}
KERNELS["backward"] = fused_kernels.backward_kernel
PROBLEMS = 64 * 36  # routing problems of a first ConvCaps layer at batch 64: more than any tile


def layer_shapes() -> set[tuple[int, int, bool]]:
    """(children I, parents O, coordinates) of every routing layer of the presets on every dataset's classes.

    The class layer's children are counted at 3 x 3 positions (28 x 28 inputs, the fewest); I only bounds
    lse's children per program, which every layer here exceeds."""
    shapes = set()
    for widths in PRESETS.values():
        shapes.add((9 * widths["B"], widths["C"], False))  # ConvCaps1, 3 x 3 kernel
        shapes.add((9 * widths["C"], widths["D"], False))  # ConvCaps2
        for spec in DATASETS.values():
            for coord_add in (True, False):
                shapes.add((9 * widths["D"], len(spec.classes), coord_add))  # ClassCaps
    return shapes


def launches() -> dict[tuple, tuple[str, fused_votes.Launch]]:
    """Every distinct kernel launch of a routing call of those layers, keyed by (kernel, constexprs, warps)."""
    found = {}
    for I, O, has_c in sorted(layer_shapes()):
        for name, launch in (
            ("moments", fused_votes.moments_launch(PROBLEMS, I, O, has_c=has_c, has_e=False)),
            ("moments", fused_votes.moments_launch(PROBLEMS, I, O, has_c=has_c, has_e=True)),
            ("lse", fused_votes.lse_launch(PROBLEMS, I, O, has_c=has_c)),
            ("backward", fused_votes.backward_launch(PROBLEMS, I, O, has_c=has_c, has_e=False, lse=False)),
            ("backward", fused_votes.backward_launch(PROBLEMS, I, O, has_c=has_c, has_e=True, lse=False)),
            ("backward", fused_votes.backward_launch(PROBLEMS, I, O, has_c=has_c, has_e=True, lse=True)),
        ):
            found[(name, tuple(sorted(launch.constexprs.items())), launch.warps)] = (name, launch)
    return dict(sorted(found.items(), key=lambda item: (list(KERNELS).index(item[0][0]), item[0])))


@functools.cache
def compile_kernel(name: str, constexprs: tuple, warps: int, arch: Arch) -> dict:
    """Compile one kernel with `constexprs` ((name, value) pairs) and `warps` for `arch`; -> registers, spill bytes
    (stores + loads), shared bytes (ptxas -v)."""
    fn, launch = KERNELS[name], fused_votes.Launch((1, 1), dict(constexprs), warps)
    signature = {
        arg: "constexpr" if arg in launch.constexprs else "i32" if arg in fused_kernels.SIZES else "*fp32"
        for arg in fn.arg_names
    }
    # torch allocates every tensor the kernels get 16-byte aligned, and Triton specialises on that
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if signature[arg] == "*fp32"}
    source = triton.compiler.ASTSource(fn, signature, launch.constexprs, aligned)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(
            source, target=GPUTarget("cuda", arch.capability, 32), options={"num_warps": launch.warps}
        )
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {
        "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
        "shared_bytes": kernel.metadata.shared,
    }


def occupancy(registers: int, shared: int, warps: int, arch: Arch) -> int:
    """Programs of `warps` warps one SM holds, by registers, warps, program slots and shared memory."""
    per_warp = math.ceil(registers * 32 / arch.register_unit) * arch.register_unit
    by_shared = arch.shared_per_sm // (shared + arch.shared_reserved)
    return min(arch.registers_per_sm // (per_warp * warps), arch.warps_per_sm // warps, arch.programs_per_sm, by_shared)


def measure(selected: dict[tuple, tuple[str, fused_votes.Launch]]) -> list[dict]:
    """One record per launch and arch: the kernel, its constexprs and warps, resources and occupancy."""
    records = []
    for name, launch in selected.values():
        for arch in ARCHS:
            used = compile_kernel(name, tuple(sorted(launch.constexprs.items())), launch.warps, arch)
            programs = occupancy(used["registers"], used["shared_bytes"], launch.warps, arch)
            records.append(
                {"kernel": name, **launch.constexprs, "warps": launch.warps, "arch": f"sm_{arch.capability}", **used}
                | {"programs_per_sm": programs, "warps_per_sm": programs * launch.warps}
            )
    return records


def table(records: list[dict]) -> str:
    """The records as a markdown table."""
    rows = [
        "| kernel | specialisation | tile (BN x BO, BI) | warps | arch | registers | spills | shared | programs / SM "
        "| warps / SM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        flags = ", ".join(f"{k}={int(r[k])}" for k in ("HAS_C", "HAS_E", "LSE") if k in r)
        tile = f"{r['BN']} x {r['BO']}" + (f", {r['BI']}" if "BI" in r else "")
        rows.append(
            f"| {r['kernel']} | {flags} | {tile} | {r['warps']} | {r['arch']} | {r['registers']} | "
            f"{r['spill_bytes']} B | {r['shared_bytes']} B | {r['programs_per_sm']} | {r['warps_per_sm']} |"
        )
    return "\n".join(rows)


CANDIDATES = {
    "moments": [fused_votes.Tile(n, o, w) for n in (4, 8, 16) for o in (4, 8, 16) for w in (2, 4, 8)],
    "backward": [fused_votes.Tile(n, o, w) for n in (4, 8, 16) for o in (4, 8, 16) for w in (2, 4, 8)],
    "lse": [fused_votes.LseTile(rows, 16, w) for rows in (64, 128, 256) for w in (2, 4, 8)],
}


def candidates() -> list[dict]:
    """For each kernel and candidate tile: the worst case over its launches and both archs."""
    rows, chosen = [], fused_votes.GPU_BLOCKS
    for name, tiles in CANDIDATES.items():
        for tile in tiles:
            fused_votes.GPU_BLOCKS = chosen._replace(**{name: tile})
            records = measure({k: v for k, v in launches().items() if k[0] == name})
            rows.append(
                {"kernel": name, "tile": tuple(tile), "launches": len(records)}
                | {k: max(r[k] for r in records) for k in ("registers", "spill_bytes", "shared_bytes")}
                | {"warps_per_sm": min(r["warps_per_sm"] for r in records)}
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress: the full run takes minutes
    fused_votes.GPU_BLOCKS = chosen
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="one JSON line per launch and arch")
    mode.add_argument("--candidates", action="store_true", help="the tiles tried for GPU_BLOCKS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache  # keep nothing
        knobs.compilation.always_compile = True  # ptxas reports only when it runs
        knobs.nvidia.dump_ptxas_log = True
        if args.candidates:
            for row in candidates():
                print(json.dumps(row))
            return
        records = measure(launches())
    print("\n".join(map(json.dumps, records)) if args.json else table(records))


if __name__ == "__main__":
    main()
