"""What a run prints: the Markdown table against the peaks, our job's stage shares, the CPU's name."""

from __future__ import annotations

from pathlib import Path

from benchmarks.runs import Result


def table(results: list[Result], peak: dict, baseline: str | None) -> str:
    """A Markdown table; ratios are to ``baseline``'s questions/s, GFLOP/s against the peak of each
    result's precision measured in the same run."""
    base = next((r for r in results if r.name == baseline), None)
    lines = ["| system | questions/s | windows/s | F1 | EM | x peer | useful GFLOP/s | % of peak | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        ratio = f"{r.questions_per_s / base.questions_per_s:.2f}" if base else "-"
        share = 100 * r.useful_gflops / peak[r.precision] if peak.get(r.precision) else float("nan")
        lines.append(f"| {r.name} | {r.questions_per_s:.1f} | {r.windows_per_s:.1f} | {r.f1:.2f} | "
                     f"{r.exact_match:.2f} | {ratio} | {r.useful_gflops:.1f} | {share:.0f}% ({r.precision}) | "
                     f"{r.peak_rss_mb:.0f} |")
    return "\n".join(lines)


def stage_shares(results: list[Result]) -> str:
    """Where our job's actors spend their time: tokenize / infer / decode seconds and shares."""
    lines = []
    for r in results:
        stages = r.extra.get("stages")
        if stages:
            total = sum(stages.get(k, 0.0) for k in ("tokenize", "infer", "decode")) or 1.0
            shares = ", ".join(f"{k} {stages[k]:.2f}s ({100 * stages[k] / total:.0f}%)"
                               for k in ("tokenize", "infer", "decode") if k in stages)
            pad = stages.get("padded_tokens", 0) / max(stages.get("tokens", 1), 1)
            ready = r.extra.get("until_first_actor_ready_s")
            startup = (f"; first actor ready {ready:.1f} s after the start (model loads: "
                       f"{stages.get('model_load', 0.0):.1f} actor-s)" if ready is not None else "")
            lines.append(f"- {r.name}: {shares}; computed/real tokens {pad:.3f}; "
                         f"{r.questions / total:.1f} questions per busy actor-second{startup}")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
