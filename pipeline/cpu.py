"""What this CPU's flags mean for the kernels we ask for: a CPU class, ONNX Runtime's kernel options, bf16, and the
sequence lengths OpenVINO is fed.

One table (CPU_CLASSES), first match wins, read from the flags Linux prints in /proc/cpuinfo. Where the flags
cannot be read (not Linux, not x86) the flag set is empty and the last, catch-all row applies: the safe options,
right answers on any CPU at some cost in speed.

Why the options differ: ONNX Runtime's fast int8 kernel multiplies u8 activations by s8 weights. With VNNI
(AVX-512 VNNI, AVX-VNNI) or AMX the products are summed into 32 bits and are exact. Without it (AVX2 only,
AVX-512 before Cascade Lake) it uses vpmaddubsw, whose 16-bit pair sums saturate: the answers change, for the
worse (docs/log/, "int8 on a CPU without VNNI"). There the job asks for the exact u8 x u8 kernels
(``exact_u8u8``); on VNNI/AMX CPUs that option is not free (it replaces the VNNI/AMX kernel, already exact, by a
slower one), so it is asked for only where it is needed.

Sequence lengths (``seq_multiple``): on AMX, OpenVINO's attention multiplies [L x L] scores by [L x head]
values with L as the inner dimension, which AMX tiles take in whole blocks (32 bf16 or 64 int8 a row); a
length off the block runs a tail path. Each batch is therefore padded up to a multiple of 16 tokens there
(masked, so the answers are the same arithmetic's; bf16 rounds differently on the tail path, so a few answers
change). On AMX the padded batches are faster for OpenVINO bf16 and int8-bf16 and for the NNCF int8 IR (f32
between its int8 ops), on the default model and on BERT-base, and a multiple of 32 or 64 tokens was no faster
than 16 (docs/log/, "Batches padded to whole AMX tiles, attention projections split"). Only where the
matmuls run on tiles (bf16, the int8 IR): OpenVINO f32 runs on AVX-512, where the same padding only added
tokens to compute and changed no answer. Other classes pad nothing (not measured there).
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# QA_CPUINFO: read the flags from this file instead, in /proc/cpuinfo's format. Tests start Ray nodes with it
# to stand for CPUs this machine is not (a node of another class in a cluster; pipeline/precision.py).
CPUINFO = Path(os.environ.get("QA_CPUINFO", "/proc/cpuinfo"))


@dataclass(frozen=True)
class KernelOptions:
    """ONNX Runtime kernel choices for one CPU. ``exact_u8u8``: session.x64quantprecision=1, the exact
    u8 x u8 int8 kernels instead of the fast u8 x s8 one (which saturates without VNNI)."""

    exact_u8u8: bool
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class CpuClass:
    """A row of the table: the class a CPU with all of ``requires`` belongs to, its ONNX Runtime kernel options,
    and the multiple OpenVINO's batches are padded to in length (see the module docstring)."""

    name: str
    requires: frozenset[str]
    kernels: KernelOptions
    seq_multiple: int = 1


_EXACT_INT8 = "the fast u8 x s8 kernel is exact"
_SATURATES = "the fast u8 x s8 kernel saturates (vpmaddubsw 16-bit pair sums): exact u8 x u8 kernels"

# First match wins; the last row requires nothing and catches every other CPU, unreadable flags included.
CPU_CLASSES: tuple[CpuClass, ...] = (
    CpuClass("amx", frozenset({"amx_int8"}), KernelOptions(False, f"AMX int8 tiles: {_EXACT_INT8}"),
             seq_multiple=16),
    CpuClass("avx512-vnni", frozenset({"avx512_vnni"}), KernelOptions(False, f"AVX-512 VNNI: {_EXACT_INT8}")),
    CpuClass("avx-vnni", frozenset({"avx_vnni"}), KernelOptions(False, f"AVX-VNNI: {_EXACT_INT8}")),
    CpuClass("avx512", frozenset({"avx512bw"}), KernelOptions(True, f"AVX-512 without VNNI: {_SATURATES}")),
    CpuClass("avx2", frozenset({"avx2"}), KernelOptions(True, f"AVX2 without VNNI: {_SATURATES}")),
    CpuClass("other", frozenset(), KernelOptions(True, "no AVX2/VNNI flags seen (or none readable): "
                                                        "exact u8 x u8 kernels, right answers on any CPU")),
)

# Either gives OpenVINO bfloat16 matmuls (AMX tiles, or AVX-512 BF16 dot products).
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The flags every processor listed in a /proc/cpuinfo text has (an actor may run on any of them);
    empty when there is no "flags" line (other systems, other architectures)."""
    sets = [frozenset(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
            if line.split(":", 1)[0].strip() == "flags" and ":" in line]
    return frozenset.intersection(*sets) if sets else frozenset()


def read_flags(path: Path = CPUINFO) -> frozenset[str]:
    """This machine's flags; empty where they cannot be read."""
    try:
        return parse_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


def model_name(path: Path = CPUINFO) -> str:
    """The processor's name as Linux reports it ("Intel(R) Xeon(R) Processor"), for tables and the model card."""
    try:
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def local_flags() -> frozenset[str]:
    """This machine's flags, read once per process."""
    return read_flags()


def classify(flags: Iterable[str]) -> CpuClass:
    """The first row of CPU_CLASSES whose required flags are all present."""
    have = frozenset(flags)
    return next(row for row in CPU_CLASSES if row.requires <= have)


def cpu_class(flags: Iterable[str] | None = None) -> str:
    """The class name ("amx", "avx512-vnni", "avx2", ...) of these flags, or of this CPU's."""
    return classify(local_flags() if flags is None else flags).name


def kernel_options(flags: Iterable[str] | None = None) -> KernelOptions:
    """The kernel options for these flags, or for this CPU's."""
    return classify(local_flags() if flags is None else flags).kernels


def has_bf16_matmuls(flags: Iterable[str] | None = None) -> bool:
    """Whether these flags (or this CPU's) give bfloat16 matmuls: AMX-BF16 or AVX-512 BF16."""
    return bool(BF16_FLAGS & frozenset(local_flags() if flags is None else flags))


def seq_multiple(flags: Iterable[str] | None = None) -> int:
    """What OpenVINO's batch lengths are padded up to a multiple of, for these flags or this CPU's."""
    return classify(local_flags() if flags is None else flags).seq_multiple
