"""Nightly refresh (issue 32): a full run against ``--mode refresh`` after a night that edits, adds and deletes a
few percent of the rows; and the reuse path alone at up to 1,000,000 rows with a tiny model.

    python -m benchmarks.refresh                         # the whole benchmark (about 40 min on 2 cores)
    python -m benchmarks.refresh --rows 2000 --million-sizes 2000,6000 --results /tmp/r   # a quick try
    python -m benchmarks.refresh --render benchmarks/results/refresh.json   # the page again from kept results

Every job is a whole process, ``python -m jobs.answer --input IN --output OUT --mode refresh`` (the default model,
unless said), timed from outside, start to exit, joining a Ray head this script starts on 127.0.0.1 with this
machine's CPUs (tests/multinode.py's LocalCluster: its own ports, temp dir and token; stopped by its process
group, never ``ray stop``). So the driver is that process alone: its peak resident memory is ``ru_maxrss`` of
``os.wait4`` (KiB on Linux), taken by a small launcher (``LAUNCHER``), checked against VmHWM read from /proc every
0.2 s while it runs.

**SQuAD** (default model). Night one: ``--rows`` rows in ``--files`` Parquet files (id, question, context): SQuAD
v1.1 train's questions with their paragraphs, in file order (87,599); past those, the same questions again, each
over the next paragraph of its article (``<id>-p1``; the model answers them all the same). A full run: ``--mode
refresh`` into an empty output is one. Night two, in the same folder: ``--change`` of the rows (1%) deleted and as
many edited (alternately the context, one sentence appended, and the question, words prepended), drawn at random
(seed 32) over the files, which are rewritten; as many new rows (SQuAD dev questions with their paragraphs) land as
a new file. Then ``--repeats`` refreshes of night two, each into its own copy of night one's committed output (the
copy is not timed), and the full run on night two's input into an empty output (``--skip-full-two``: night one's
full run stands for it). The refresh's counts are checked against what the night changed, and its answers
against the night-two full run's, row by row.

**Reuse path** (a tiny random-weight model, tests/tiny_models.py; short synthetic rows, each unique). For each of
``--million-sizes``: a full run on that many rows (files of 100,000), then one row edited and a refresh: rows
reused grow with the size, the rows answered stay 1. The driver's peak memory in each.

Each run records the machine's busy CPU-seconds outside this script's process tree (neighbours: the machine may be
shared), and the 1-minute load average. Results: ``<results>/refresh.json`` (raw) and ``refresh.md`` (the page,
rendered from the json; ``--render`` renders it again, with any ``notes`` added to the json by hand).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.marginal import TreeCpu, load_average, machine_busy_seconds, proc_table, wait_for_quiet
from benchmarks.provenance import REPO, code_note, cpu_info, git, tree_state

SQUAD = REPO.parent / "shared" / "data" / "squad"
TRAIN, DEV = SQUAD / "train-v1.1.json.gz", SQUAD / "dev-v1.1.json"
RESULTS = REPO / "benchmarks" / "results"
SEED = 32
TINY_FILE_ROWS = 100_000
JOB = [sys.executable, "-m", "jobs.answer"]


# -- inputs ------------------------------------------------------------------------------------------------------

def squad_rows(path: Path, n: int, prefix: str = "") -> list[dict]:
    """``n`` rows of a SQuAD file: its questions with their paragraphs, in file order; then again, each question
    over the k-th next paragraph of its article (id ``<id>-p<k>``), as many times as it takes."""
    from pipeline.squad import load_squad

    articles = load_squad(path)
    base = [(qa["id"], qa["question"], a, p) for a, art in enumerate(articles)
            for p, para in enumerate(art["paragraphs"]) for qa in para["qas"]]
    rows: list[dict] = []
    k = 0
    while len(rows) < n:
        for qid, question, a, p in base[:n - len(rows)]:
            paragraphs = articles[a]["paragraphs"]
            rows.append({"id": prefix + (qid if k == 0 else f"{qid}-p{k}"), "question": question,
                         "context": paragraphs[(p + k) % len(paragraphs)]["context"]})
        k += 1
    return rows


def write_files(rows: list[dict], folder: Path, files: int, name: str = "part") -> list[Path]:
    """``rows`` in ``files`` Parquet files of consecutive rows."""
    folder.mkdir(parents=True, exist_ok=True)
    per = math.ceil(len(rows) / files)
    out = []
    for f in range(files):
        path = folder / f"{name}-{f:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[f * per:(f + 1) * per]), path)
        out.append(path)
    return out


def night_two(folder: Path, share: float, rng: random.Random) -> dict:
    """Deletes and edits ``share`` of the rows each (rewriting the files they are in) and adds as many new rows
    (SQuAD dev) as a new file. Returns what changed."""
    paths = sorted(folder.glob("part-*.parquet"))
    tables = {p: pq.read_table(p).to_pylist() for p in paths}
    places = [(p, i) for p in paths for i in range(len(tables[p]))]
    n = round(share * len(places))
    picked = rng.sample(places, 2 * n)
    deleted, edited = set(picked[:n]), picked[n:]
    edits = {"context": 0, "question": 0}
    for j, (p, i) in enumerate(sorted(edited)):
        row = tables[p][i]
        if j % 2 == 0:
            row["context"] += " This paragraph was revised last night."
            edits["context"] += 1
        else:
            row["question"] = "According to the revised text, " + row["question"]
            edits["question"] += 1
    touched = {p for p, _ in picked}
    for p in touched:
        keep = [r for i, r in enumerate(tables[p]) if (p, i) not in deleted]
        pq.write_table(pa.Table.from_pylist(keep), p)
    new = squad_rows(DEV, n, prefix="new-")
    pq.write_table(pa.Table.from_pylist(new), folder / "part-new.parquet")
    return {"rows_before": len(places), "deleted": n, "edited": n, "edited_contexts": edits["context"],
            "edited_questions": edits["question"], "new": len(new), "rows_after": len(places) - n + len(new),
            "files_rewritten": len(touched), "files_new": 1}


def tiny_rows(start: int, stop: int) -> pa.Table:
    """Short synthetic rows, each with its own question and context (the tiny model's vocabulary, and digits)."""
    ids = range(start, stop)
    return pa.table({"id": [f"t{i:07d}" for i in ids],
                     "question": [f"who was the king {i % 997} of the city {i}?" for i in ids],
                     "context": [f"the king {i % 997} was born in paris in the year {i}. the river runs by the city "
                                 f"of {i % 31} and the queen was first." for i in ids]})


def write_tiny(folder: Path, rows: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, start in enumerate(range(0, rows, TINY_FILE_ROWS)):
        path = folder / f"part-{k:05d}.parquet"
        pq.write_table(tiny_rows(start, min(rows, start + TINY_FILE_ROWS)), path)
        out.append(path)
    return out


def edit_one_row(path: Path) -> str:
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["context"] += " and the war was last."
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return rows[0]["id"]


# -- running a job -----------------------------------------------------------------------------------------------

def _vm_kb(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("VmHWM", "VmRSS")}


# The driver is started through this small launcher, which forks it and waits for it with os.wait4. A process
# forked (or vforked, as subprocess does) from this script would inherit this script's peak RSS in its ru_maxrss:
# Linux carries the old address space's high-water mark across exec. The launcher's own is a bare Python's.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{pid} {usage.ru_maxrss} {usage.ru_utime} {usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def tree_ticks(root: int) -> dict[tuple[int, str], int]:
    """{(pid, start time): utime + stime in ticks} of ``root`` and every process under it, now (TreeCpu's reading,
    taken once: TreeCpu counts each process's CPU since it started, which for this script and its long-lived Ray
    head includes what they spent before a run, so the run's own is its reading less this one's)."""
    stats, children = proc_table()
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[(pid, stats[pid][0])] = stats[pid][1]
        todo.extend(children.get(pid, []))
    return out


def run_job(label: str, args: list[str], env: dict, log: Path, quiet_wait: float = 0.0) -> dict:
    """One job as a whole process: wall seconds start to exit, the driver's peak RSS (wait4's ru_maxrss, and the
    largest VmHWM polled), the manifest's counts, the neighbours' CPU-seconds meanwhile."""
    if quiet_wait:
        wait_for_quiet(quiet_wait)
    output = Path(args[args.index("--output") + 1])
    usage_file = log.with_suffix(".rusage")
    load0 = load_average()
    code = {"head": git("rev-parse", "--short", "HEAD"), "dirty": tree_state(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    hwm = {"VmHWM": 0, "VmRSS": 0}
    done = threading.Event()
    before = tree_ticks(os.getpid())
    with open(log, "w") as out, TreeCpu(os.getpid()) as mine:
        busy0 = machine_busy_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage_file), *JOB, *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)

        def poll() -> None:
            while not done.wait(0.2):
                for child in _children(proc.pid):
                    for k, v in _vm_kb(child).items():
                        hwm[k] = max(hwm[k], v)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
    busy = machine_busy_seconds() - busy0
    ours = sum(t - before.get(k, 0) for k, t in mine.ticks.items()) / os.sysconf("SC_CLK_TCK")
    other = max(0.0, busy - ours)
    if rc != 0:
        raise RuntimeError(f"{label}: {' '.join(JOB + args)} failed (exit {rc}); {log}:\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    _, maxrss_kb, user_s, sys_s = usage_file.read_text().split()
    manifest = json.loads((output / "_manifest.json").read_text())
    lines = log.read_text(errors="replace").splitlines()
    result = {"label": label, "wall_s": round(wall, 2), "driver_peak_rss_mb": round(int(maxrss_kb) / 1024, 1),
              "driver_vmhwm_polled_mb": round(hwm["VmHWM"] / 1024, 1),
              "driver_user_s": round(float(user_s), 2), "driver_sys_s": round(float(sys_s), 2),
              "rows_in": manifest.get("rows_in"), "rows_out": manifest.get("rows_out"),
              "errors": manifest.get("errors"), "refresh": manifest.get("refresh"),
              "durations_s": manifest.get("durations_s"), "questions_per_s": manifest.get("questions_per_s"),
              "precision": (manifest.get("precision") or {}).get("variant"),
              "load_before": load0, "load_after": load_average(), "neighbour_cpu_s": round(other, 1),
              "tree_cpu_s": round(ours, 1), "code": code,
              "refresh_line": next((line for line in lines if line.startswith("refresh:")), None),
              "done_line": next((line for line in reversed(lines) if line.startswith("done:")), None)}
    print(f"  {label}: {result['wall_s']:.1f} s, driver peak RSS {result['driver_peak_rss_mb']:.0f} MB "
          f"(VmHWM polled {result['driver_vmhwm_polled_mb']:.0f}), rows out {result['rows_out']}, refresh "
          f"{json.dumps({k: v for k, v in (result['refresh'] or {}).items() if k != 'replaces'})}, "
          f"neighbours {other:.0f} CPU-s", flush=True)
    return result


def job_args(inputs: Path, output: Path, model: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--input", str(inputs), "--output", str(output), "--mode", "refresh",
            *(["--model", str(model)] if model else []), *extra]


def compare_outputs(a: Path, b: Path) -> dict:
    """Rows of two committed outputs, by id: how many differ in an answer column, and in any column."""
    answer_cols = ["answer", "answer_start", "answer_end", "score", "probability", "error"]

    def rows(out: Path) -> pa.Table:
        manifest = json.loads((out / "_manifest.json").read_text())
        return pa.concat_tables([pq.read_table(out / Path(f["path"]).name) for f in manifest["output_files"]]
                                ).sort_by("id")

    ta, tb = rows(a), rows(b)
    same_ids = ta.column("id").equals(tb.column("id"))
    out = {"rows_a": ta.num_rows, "rows_b": tb.num_rows, "same_ids": same_ids}
    if same_ids:
        rows_differing = {c: {i for i, (x, y) in enumerate(zip(ta.column(c).to_pylist(), tb.column(c).to_pylist()))
                              if x != y} for c in ta.column_names if c in tb.column_names}
        out["rows_differing_by_column"] = {c: len(v) for c, v in rows_differing.items() if v}
        out["answer_rows_differing"] = len(set().union(*(rows_differing.get(c, set()) for c in answer_cols)))
    return out


# -- the two parts -----------------------------------------------------------------------------------------------

def squad_part(a, work: Path, env: dict) -> dict:
    inputs, logs = work / "squad-in", work / "logs"
    rows = squad_rows(TRAIN, a.rows)
    write_files(rows, inputs, a.files)
    del rows
    print(f"SQuAD: {a.rows} rows in {a.files} files", flush=True)
    runs = [run_job("full, night one", job_args(inputs, work / "out-night1"), env, logs / "full1.log",
                    a.quiet_wait)]
    changes = night_two(inputs, a.change, random.Random(SEED))
    print(f"night two: {json.dumps(changes)}", flush=True)
    for r in range(1, a.repeats + 1):
        out = work / f"out-refresh-{r}"
        shutil.copytree(work / "out-night1", out)
        runs.append(run_job(f"refresh {r}", job_args(inputs, out), env, logs / f"refresh{r}.log", a.quiet_wait))
    if a.local_ray:
        out = work / "out-refresh-local"
        shutil.copytree(work / "out-night1", out)
        local_env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
        runs.append(run_job("refresh, own local Ray", job_args(inputs, out, extra=("--address", "local")),
                            local_env, logs / "refresh-local.log", a.quiet_wait))
    checks = {}
    if not a.skip_full_two:
        runs.append(run_job("full, night two", job_args(inputs, work / "out-full2"), env, logs / "full2.log",
                            a.quiet_wait))
        checks["refresh_1_vs_full_two"] = compare_outputs(work / "out-refresh-1", work / "out-full2")
    expected = {"rows_reused": changes["rows_before"] - changes["deleted"] - changes["edited"],
                "rows_answered": changes["edited"] + changes["new"], "rows_out": changes["rows_after"]}
    checks["expected"] = expected
    checks["counts_as_expected"] = all(
        r["refresh"].get("rows_reused") == expected["rows_reused"]
        and r["refresh"].get("rows_answered") == expected["rows_answered"] and r["rows_out"] == expected["rows_out"]
        for r in runs if r["label"].startswith("refresh"))
    return {"rows": a.rows, "files": a.files, "change": a.change, "changes": changes, "runs": runs, "checks": checks}


def million_part(a, work: Path, env: dict) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import write_model_dir

    model = write_model_dir(work / "tiny-model")
    runs = []
    for n in a.million_sizes:
        inputs, out = work / f"tiny-in-{n}", work / f"tiny-out-{n}"
        files = write_tiny(inputs, n)
        print(f"tiny: {n} rows in {len(files)} files", flush=True)
        full = run_job(f"tiny full, {n}", job_args(inputs, out, model), env, work / "logs" / f"tiny-full-{n}.log",
                       a.quiet_wait)
        edited = edit_one_row(files[-1])
        refresh = run_job(f"tiny refresh, {n}", job_args(inputs, out, model), env,
                          work / "logs" / f"tiny-refresh-{n}.log", a.quiet_wait)
        runs.append({"rows": n, "edited_id": edited, "full": full, "refresh": refresh})
        shutil.rmtree(inputs, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"model": "tests/tiny_models.py write_model_dir (2 layers, hidden 32, random weights)", "runs": runs}


# -- the page ----------------------------------------------------------------------------------------------------

def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def render(res: dict) -> str:
    cpu, cores = res["cpu"], res["cores"]
    date = res["date"][:10]
    lines = [f"## Nightly refresh (issue 32): {cpu['model']} (CPU class `{cpu['class']}`), {cores} cores ({date})",
             "",
             (f"`lscpu`: {cpu['model']}, {cpu['flags_of_note']}; {cores} cores; "
             f"`python -c \"from pipeline.cpu import cpu_class; print(cpu_class())\"`: {cpu['class']}. "
             f"Commit {res['commit']}{code_note(res)}; whole run {res['total_min']:.1f} min:"),
             "", "```bash", res["command"], "```", ""]
    lines += [("Every job is a whole process, `python -m jobs.answer --input IN --output OUT --mode refresh`, timed "
              "start to exit, joined (`RAY_ADDRESS`) to one Ray head the script started with "
              f"{cores} CPUs, so its wall time holds the process start, imports, planning, the reuse pass, "
              "answering and the commit, but not Ray's own start. Driver peak RSS: `ru_maxrss` of that process "
              "(`os.wait4`)."), ""]
    sq = res.get("squad")
    if sq:
        ch = sq["changes"]
        runs = sq["runs"]
        full1 = next(r for r in runs if r["label"] == "full, night one")
        full2 = next((r for r in runs if r["label"] == "full, night two"), None)
        full = full2 or full1
        refreshes = [r for r in runs if r["label"].startswith("refresh ") and r["label"][8:].isdigit()]
        med = statistics.median(r["wall_s"] for r in refreshes)
        lines += [(f"**SQuAD, default model.** Night one: {sq['rows']:,} rows (SQuAD v1.1 train questions with their "
                  f"paragraphs; past 87,599, the same questions over the next paragraph of their article) in "
                  f"{sq['files']} Parquet files. Night two: {ch['deleted']:,} rows deleted, {ch['edited']:,} edited "
                  f"({ch['edited_contexts']:,} contexts, {ch['edited_questions']:,} questions), "
                  f"{ch['new']:,} new (SQuAD dev, one new file); {ch['files_rewritten']} files rewritten; "
                  f"{ch['rows_after']:,} rows. Each refresh runs over its own copy of night one's output. "
                  f"Ratio: the full run's wall time "
                  f"({'night two' if full2 else 'night one, standing for night two'}) over the run's."), "",
                  ("| run | rows out | rows reused | rows answered | wall s | job's own total s | full run / this "
                  f"| driver peak RSS MB | reused rows/s/core | {machine_header(runs)} |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in runs:
            rf = r["refresh"] or {}
            reused = rf.get("rows_reused", 0) or 0
            answered = rf.get("rows_answered", r["rows_out"] - reused)
            per_core = reused / r["wall_s"] / cores if reused else None
            lines.append(f"| {r['label']} | {r['rows_out']:,} | {reused:,} | {answered:,} | {r['wall_s']:.1f} | "
                         f"{_fmt((r['durations_s'] or {}).get('total'))} | "
                         f"{full['wall_s'] / r['wall_s']:.2f}x | {r['driver_peak_rss_mb']:.0f} | "
                         f"{_fmt(per_core, 0)} | {machine_cell(r)} |")
        lines += ["", "Job's own total: the manifest's `durations_s.total` (the job's clock, from planning to just "
                      "before the commit); the wall time adds the process start, imports, joining Ray and the commit. "
                      + MACHINE_NOTE[machine_header(runs)]]
        if any(r["label"] == "refresh, own local Ray" for r in runs):
            lines += ["", ("`refresh, own local Ray`: the same refresh with `--address local` and no `RAY_ADDRESS`, "
                          "as cron on a single machine runs it: its wall time holds starting and stopping a Ray; "
                          "its ratio is against the full run joined to the head (which did not pay that).")]
        reused = statistics.median(r["refresh"]["rows_reused"] for r in refreshes)
        lines += ["", (f"Median of the {len(refreshes)} refreshes: **{med:.1f} s**, "
                      f"**{full['wall_s'] / med:.1f}x** faster than the full run "
                      f"({full['wall_s']:.1f} s; target: at least 10x: "
                      f"{'met' if full['wall_s'] / med >= 10 else 'not met'}); "
                      f"{reused / med / cores:,.0f} rows reused per second per core; driver peak RSS "
                      f"{statistics.median(r['driver_peak_rss_mb'] for r in refreshes):.0f} MB "
                      f"(full run {full['driver_peak_rss_mb']:.0f} MB).")]
        rf = refreshes[0]["refresh"]
        lines += ["", (f"Manifest of refresh 1: rows_reused {rf.get('rows_reused')}, rows_answered "
                      f"{rf.get('rows_answered')}, answered_because {json.dumps(rf.get('answered_because'))}, "
                      f"buckets {rf.get('buckets')}, committed_rows_before {rf.get('committed_rows_before')}; "
                      f"durations_s {json.dumps(refreshes[0]['durations_s'])}. Expected from the night's changes: "
                      f"{json.dumps(sq['checks']['expected'])}: "
                      f"{'every refresh matches' if sq['checks']['counts_as_expected'] else 'MISMATCH'}.")]
        cmp = sq["checks"].get("refresh_1_vs_full_two")
        if cmp:
            lines += ["", (f"Refresh 1's output against the night-two full run's, row by row by id: same ids "
                          f"{cmp['same_ids']}, rows differing in an answer column "
                          f"{cmp.get('answer_rows_differing')}; columns that differ: "
                          f"{json.dumps(cmp.get('rows_differing_by_column'))}.")]
    mil = res.get("million")
    if mil:
        both = [r for m in mil["runs"] for r in (m["full"], m["refresh"])]
        lines += ["", (f"**The reuse path alone**, tiny model ({mil['model']}), short synthetic rows (each unique), "
                      "files of 100,000 rows: per size a full run, then one row edited and a refresh."), "",
                  ("| rows | full run s | full run driver peak RSS MB | refresh s | rows reused | rows answered | "
                  f"refresh driver peak RSS MB | reused rows/s/core | buckets | {machine_header(both)}: full; refresh |"),
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for m in mil["runs"]:
            f, r = m["full"], m["refresh"]
            rf = r["refresh"] or {}
            lines.append(f"| {m['rows']:,} | {f['wall_s']:.1f} | {f['driver_peak_rss_mb']:.0f} | {r['wall_s']:.1f} | "
                         f"{rf.get('rows_reused', 0):,} | {rf.get('rows_answered')} | "
                         f"{r['driver_peak_rss_mb']:.0f} | {rf.get('rows_reused', 0) / r['wall_s'] / cores:,.0f} | "
                         f"{rf.get('buckets')} | {machine_cell(f)}; {machine_cell(r)} |")
        lines += ["", MACHINE_NOTE[machine_header(both)].strip()]
    coded = [r for r in (sq or {}).get("runs", []) if "code" in r] + \
        [r for m in (mil or {}).get("runs", []) for r in (m["full"], m["refresh"]) if "code" in r]
    if coded:
        lines += ["", "Code each job started on (HEAD; + where jobs/, pipeline/ or models/ had uncommitted changes): "
                      + "; ".join(f"{r['label']} {r['code']['head']}{' +' if r['code']['dirty'] else ''}"
                                  for r in coded) + "."]
    if res.get("notes"):
        lines += ["", *[f"- {n}" for n in res["notes"]]]
    return "\n".join(lines) + "\n"


NEIGHBOURS, LOAD = "neighbours CPU-s (ours)", "neighbours CPU-s, at least; load average before, after"
MACHINE_NOTE = {
    NEIGHBOURS: "Neighbours CPU-s: the machine's busy CPU-seconds during the run outside this script's process tree, "
                "which holds the Ray head, its workers and the job (ours: that tree's CPU-seconds in the run): other "
                "people's work on the same cores, which the wall times include.",
    LOAD: "Neighbours CPU-s, at least: the machine's busy CPU-seconds during the run less the CPU-seconds of this "
          "script's process tree (the Ray head, its workers and the job) since each of its processes began, so "
          "less than the neighbours' (this run's script did not yet take the tree's CPU-seconds before the run "
          "off). Load average: the machine's 1-minute load average as the run began and as it ended (2 cores: above "
          "2, other work shared them). The wall times include that work."}


def machine_header(runs: list[dict]) -> str:
    return NEIGHBOURS if all("tree_cpu_s" in r for r in runs) else LOAD


def machine_cell(r: dict) -> str:
    """What else ran on the machine during ``r``: the neighbours' CPU-seconds (and ours) where measured, else the
    lower bound and the load averages (results of a script that took off the tree's CPU-seconds since each of its
    processes began, not only the run's)."""
    if "tree_cpu_s" in r:
        return f"{r['neighbour_cpu_s']:.0f} ({r['tree_cpu_s']:.0f})"
    return f"≥{r['neighbour_cpu_s']:.0f}; {r['load_before']:.1f}, {r['load_after']:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="night one's SQuAD rows (default: %(default)s)")
    p.add_argument("--files", type=int, default=10, help="night one's Parquet files (default: %(default)s)")
    p.add_argument("--change", type=float, default=0.01,
                   help="share of rows deleted, edited, and added, each (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="refreshes of night two (default: %(default)s)")
    p.add_argument("--skip-full-two", action="store_true",
                   help="no full run on night two's input (night one's full run stands for it)")
    p.add_argument("--local-ray", action="store_true",
                   help="also one refresh that starts its own local Ray (--address local), as cron on one machine")
    p.add_argument("--skip-squad", action="store_true", help="only the reuse path with the tiny model")
    p.add_argument("--million-sizes", default="100000,300000,1000000",
                   help="rows of the tiny-model reuse runs, comma-separated (default: %(default)s)")
    p.add_argument("--skip-million", action="store_true", help="no tiny-model reuse runs")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each job, wait up to this many seconds for the machine's other work to fall "
                        "under 0.25 busy cores (default: %(default)s)")
    p.add_argument("--dir", default=None, help="where inputs and outputs go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="folder for refresh.json and refresh.md (default: benchmarks/results)")
    p.add_argument("--render", type=Path, default=None, help="only render this results json to Markdown (stdout)")
    a = p.parse_args(argv)
    if a.render:
        print(render(json.loads(a.render.read_text())), end="")
        return 0
    a.million_sizes = [int(x) for x in a.million_sizes.split(",") if x]

    sys.path.insert(0, str(REPO / "tests"))
    from multinode import LocalCluster

    started = time.perf_counter()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="refresh-bench-", dir=a.dir))
    (work / "logs").mkdir()
    print(f"work folder {work}", flush=True)
    cluster = LocalCluster(work)
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git("rev-parse", "--short", "HEAD"),
           "dirty": tree_state(),
           "command": "python -m benchmarks.refresh " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpu": cpu_info(), "cores": cores}
    try:
        cluster.start_head(num_cpus=cores)
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        if not a.skip_squad:
            res["squad"] = squad_part(a, work, env)
        if not a.skip_million:
            res["million"] = million_part(a, work, env)
    finally:
        cluster.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["total_min"] = round((time.perf_counter() - started) / 60, 1)
    res["commit_at_end"], res["dirty_at_end"] = git("rev-parse", "--short", "HEAD"), tree_state()
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "refresh.json").write_text(json.dumps(res, indent=1) + "\n")
    page = render(res)
    (a.results / "refresh.md").write_text(page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
