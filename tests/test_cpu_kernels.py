"""pipeline.cpu's table on recorded flag sets of each CPU class, and session_options applying it.

Whether the exact-kernel option costs throughput on the CPU at hand is not something a unit test can assert
(timings on a shared machine mean nothing): the benchmark (benchmarks/peaks.py) measures int8 with and without
it and warns where the table chose wrong (peaks.exact_kernel_check). Here: the decision, and that the job's options
follow it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cpu
from pipeline.cpu import CPU_CLASSES, KernelOptions

# /proc/cpuinfo "flags" lines as recorded on each class of CPU this project has seen (all in VMs), plus two
# that it has not (AVX-512 before VNNI, AVX-VNNI without AVX-512) and one with nothing readable.
AVX2_EPYC = (  # AMD EPYC, AVX2 only (the CI machine)
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
    "nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes "
    "xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw "
    "topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap "
    "clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr wbnoinvd arat umip pku ospke vaes "
    "vpclmulqdq rdpid fsrm")
ZEN4_EPYC = (  # AMD EPYC Zen 4 (Genoa): AVX-512 with VNNI and BF16, no AMX
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
    "nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
    "hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch topoext perfctr_core "
    "invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq "
    "rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves "
    "avx512_bf16 clzero xsaveerptr rdpru wbnoinvd arat avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq "
    "avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm")
SAPPHIRE_RAPIDS = (  # Intel Xeon 4th gen (Sapphire Rapids): AMX
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon rep_good nopl xtopology nonstop_tsc cpuid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer "
    "aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch cpuid_fault invpcid_single ssbd ibrs ibpb "
    "stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed "
    "adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves "
    "avx_vnni avx512_bf16 wbnoinvd ida arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq "
    "avx512_vnni avx512_bitalg tme avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize "
    "tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities")
SKYLAKE_XEON = (  # Intel Xeon 1st gen Scalable (Skylake-SP): AVX-512 without VNNI
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm "
    "abm 3dnowprefetch invpcid_single pti fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm mpx "
    "avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves "
    "arat pku ospke md_clear arch_capabilities")
ALDER_LAKE = (  # Intel Core 12th gen: AVX-VNNI without AVX-512
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 "
    "ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl xtopology "
    "nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 "
    "sdbg fma cx16 xtpr pdcm sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand "
    "lahf_lm abm 3dnowprefetch cpuid_fault epb fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx "
    "smap clflushopt clwb intel_pt sha_ni xsaveopt xsavec xgetbv1 xsaves avx_vnni dtherm ida arat pln pts hwp "
    "umip pku ospke waitpkg gfni vaes vpclmulqdq rdpid movdiri movdir64b fsrm md_clear serialize arch_lbr "
    "flush_l1d arch_capabilities")

# flags -> (class, exact u8 x u8 kernels, bf16 matmuls, OpenVINO's length multiple): the decision table, one
# row per recorded CPU.
EXPECTED = {
    "AVX2 EPYC": (AVX2_EPYC, "avx2", True, False, 1),
    "Zen 4 EPYC": (ZEN4_EPYC, "avx512-vnni", False, True, 1),
    "Sapphire Rapids Xeon": (SAPPHIRE_RAPIDS, "amx", False, True, 16),
    "Skylake Xeon": (SKYLAKE_XEON, "avx512", True, False, 1),
    "Alder Lake": (ALDER_LAKE, "avx-vnni", False, False, 1),
    "nothing readable": ("", "other", True, False, 1),
}


def cpuinfo(flags: str, processors: int = 2) -> str:
    """A /proc/cpuinfo text with ``processors`` entries that all list ``flags``."""
    return "".join(f"processor\t: {i}\nvendor_id\t: X\nflags\t\t: {flags}\nbugs\t\t: sysret_ss_attrs\n\n"
                   for i in range(processors))


@pytest.mark.parametrize("name", EXPECTED)
def test_decision_table_on_recorded_flags(name):
    line, klass, exact, bf16, multiple = EXPECTED[name]
    flags = cpu.parse_flags(cpuinfo(line))
    assert flags == frozenset(line.split())
    assert cpu.cpu_class(flags) == klass
    options = cpu.kernel_options(flags)
    assert options == KernelOptions(exact_u8u8=exact) and options.reason
    assert cpu.has_bf16_matmuls(flags) is bf16
    assert cpu.seq_multiple(flags) == multiple


def test_exact_kernels_exactly_where_there_is_no_vnni():
    """The rule itself: any of these flags makes the fast kernel exact; without all of them it saturates."""
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"}
    for name, (line, _, exact, _, _) in EXPECTED.items():
        assert exact == (not vnni & set(line.split())), name


def test_table_is_data_and_ends_in_a_catch_all():
    names = [row.name for row in CPU_CLASSES]
    assert len(set(names)) == len(names)
    assert CPU_CLASSES[-1].requires == frozenset() and CPU_CLASSES[-1].kernels.exact_u8u8  # the safe options
    assert {"amx", "avx512-vnni", "avx2"} <= set(names)  # the three classes this project has seen


def test_flags_every_processor_has(tmp_path):
    """A processor without VNNI makes the whole machine need the exact kernels: an actor may run on it."""
    text = cpuinfo(ZEN4_EPYC, 1) + cpuinfo(ZEN4_EPYC.replace(" avx512_vnni", ""), 1)
    assert cpu.cpu_class(cpu.parse_flags(text)) == "avx512"
    assert cpu.kernel_options(cpu.parse_flags(text)).exact_u8u8
    # Other systems and architectures: no flags line (aarch64 prints "Features"), or no file at all.
    assert cpu.parse_flags("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n") == frozenset()
    assert cpu.read_flags(tmp_path / "missing") == frozenset()
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo(SAPPHIRE_RAPIDS))
    assert cpu.cpu_class(cpu.read_flags(path)) == "amx"


def test_session_options_follow_the_decision_for_this_cpu():
    from pipeline.session import ALLOW_SPINNING_KEY, EXACT_U8U8_KEY, asks_exact_u8u8, session_options

    decided = cpu.kernel_options()
    assert decided == cpu.kernel_options(cpu.read_flags())  # read once per process, the same answer
    opts = session_options(1)
    assert asks_exact_u8u8(opts) == decided.exact_u8u8
    if decided.exact_u8u8:
        assert opts.get_session_config_entry(EXACT_U8U8_KEY) == "1"
    # Given options win over this CPU's, as the second argument too.
    assert asks_exact_u8u8(session_options(1, kernels=KernelOptions(exact_u8u8=True)))
    assert not asks_exact_u8u8(session_options(1, kernels=KernelOptions(exact_u8u8=False)))
    assert asks_exact_u8u8(session_options(2, KernelOptions(exact_u8u8=True)))
    # The job's pool threads never busy-wait (only the benchmark's tuning mode turns that on, for itself).
    assert opts.get_session_config_entry(ALLOW_SPINNING_KEY) == "0"


def test_decision_agrees_with_this_cpus_fast_kernel():
    """On the CPU at hand: where the table leaves the option off, the fast kernel must be exact; where it
    names a class without VNNI, the fast kernel does saturate (the option is needed)."""
    pytest.importorskip("onnx")
    from benchmarks.peaks import fast_int8_kernel_saturates

    saturates = fast_int8_kernel_saturates()
    if not cpu.kernel_options().exact_u8u8:
        assert not saturates
    if cpu.cpu_class() in ("avx2", "avx512"):
        assert saturates


def test_seven_bit_weights_make_the_fast_kernel_exact():
    """The extremes of 7-bit weights (models.convert's int8-7bit graph) never saturate the fast kernel, on this
    CPU whatever its class: where 8-bit ones do (no VNNI), this is what --precision int8-7bit relies on."""
    pytest.importorskip("onnx")
    from benchmarks.peaks import fast_int8_kernel_saturates

    assert not fast_int8_kernel_saturates((64, -64))
    from pipeline.backends import INT8_7BIT_GRAPH, SEVEN_BIT_KERNELS, kernels_for

    assert not SEVEN_BIT_KERNELS.exact_u8u8
    # The graph gets them however it is named to the job: --precision int8-7bit, or the file as --model.
    assert kernels_for(Path("models/minilm-squad") / INT8_7BIT_GRAPH) is SEVEN_BIT_KERNELS
    assert kernels_for(Path("models/minilm-squad/model.onnx")) is None
