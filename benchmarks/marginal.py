"""--mode marginal: questions/s of whole processes, our job as a user runs it against the transformers pipeline
(on PyTorch, and on optimum-intel's OpenVINO model).

    python -m benchmarks --data dev-v1.1.json --mode marginal \\
        --models default=1000,bert-base=150,bert-large=40 \\
        --variants="default; --precision int8-dynamic; --backend openvino --precision fp32; --precision int8"

For each model, each system runs as a fresh process on the first N and the first 2N questions of --data, and
its wall time T is taken from outside, start to exit: imports, Ray, model load and writing are all in it. The
marginal rate N / (T(2N) - T(N)) is what one more question costs once a process is up, the rate a large table
sees; the fixed costs cancel.

- Our job: ``python -m jobs.answer --input IN --output OUT --address local`` plus a variant's flags. A variant
  is a set of job flags; "default" adds none (no --backend, no --precision), so it follows the job's default.
  ``--address local``: a fresh local Ray, never a cluster another process on the machine started. The input
  is one Parquet file, read in the job's default units (1024 rows; ``--rows-per-unit`` overrides): the job
  itself cuts a pass's last units into pieces that shrink towards its end (pipeline.poison.first_pass), so
  the first N <= 1024 questions, one read unit, still keep every actor busy.
- The peers, both ``python -m benchmarks.peer`` on the same weights (for the default model a Hugging Face
  directory made from its weights-bf16.safetensors, or --hf-model; for the random models their checkpoint),
  batch --hf-batch-size (8), our window settings, --cpus threads, repeats interleaved with our job's:
  "transformers pipeline" (``pipeline("question-answering", device=-1)``, PyTorch eager fp32) and
  "optimum-intel pipeline" (``--runtime openvino``: the same pipeline on optimum-intel's
  ``OVModelForQuestionAnswering.from_pretrained(dir, export=True)``, exported inside the timed process,
  OpenVINO's default precision: bf16 on AMX and AVX512-BF16 CPUs). Each row has a ratio column per peer.
  ``--skip-peer torch`` / ``--skip-peer openvino`` leaves one out; a peer whose packages are missing is left
  out with a one-line note naming the pip command.
- Models: "default" is --model (the job's default model); "bert-base" (12 x 768) and "bert-large" (24 x 1024)
  are random-weight BertForQuestionAnswering checkpoints (fixed seed, the default model's uncased vocabulary)
  saved with save_pretrained and converted by ``python -m models.convert`` (--optimize: fused attention like
  our exports; then --quantize int8 from that fused fp32 graph, which also writes the NNCF model-int8.xml,
  calibrated on SQuAD train; the fused fp32 graph is kept as model-fp32.onnx for OpenVINO), built once under
  --work-dir and reused. Random weights answer at random: their F1 is printed but means nothing, speed only.

Every table's header names the CPU and its class (pipeline.cpu.cpu_class), the class a variant's numbers
hold for.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

from benchmarks.report import cpu_name
from jobs.config import DEFAULT_MODEL
from pipeline import squad

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ("default; --precision int8-dynamic; --backend openvino --precision fp32; "
                    "--precision int8")
DEFAULT_MODELS = "default=1000,bert-base=150,bert-large=40"
PEER_NAME = "transformers pipeline"  # on PyTorch
OV_PEER_NAME = "optimum-intel pipeline"  # the same pipeline on optimum-intel's OpenVINO model
PEERS = {"torch": PEER_NAME, "openvino": OV_PEER_NAME}  # benchmarks.peer --runtime: the row's name
BOUND_NAME = "bound: answering stage in bare processes"
SEED = 0
CALIBRATION_QUESTIONS = 64  # random weights: the IR's scales change no speed, so calibration stays short


@dataclass(frozen=True)
class Shape:
    """A BERT encoder's size: what a random-weight checkpoint of it is built with."""

    layers: int
    hidden: int
    heads: int
    intermediate: int


RANDOM_SHAPES = {"bert-base": Shape(12, 768, 12, 3072), "bert-large": Shape(24, 1024, 16, 4096)}


@dataclass(frozen=True)
class Variant:
    """Our job with these flags on top of its defaults; "default" has none."""

    name: str
    flags: tuple[str, ...]


def parse_variants(text: str) -> list[Variant]:
    """"default; --precision int8" -> [Variant("default", ()), Variant("--precision int8", (...))]."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        flags = () if part == "default" else tuple(shlex.split(part))
        if any(f in ("--input", "--output", "--model", "--address") for f in flags):
            raise ValueError(f"variant {part!r}: --input/--output/--model/--address are the benchmark's to set")
        out.append(Variant(part, flags))
    if not out:
        raise ValueError("--variants names no variant; e.g. --variants='default; --precision int8'")
    return out


def parse_models(text: str) -> list[tuple[str, int]]:
    """"default=1000,bert-base=150" -> [("default", 1000), ("bert-base", 150)]."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, n = part.partition("=")
        if name != "default" and name not in RANDOM_SHAPES:
            raise ValueError(f"--models: unknown model {name!r}; choose from default, {', '.join(RANDOM_SHAPES)}")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--models: {part!r} needs a question count, e.g. {name}=100")
        out.append((name, int(n)))
    return out


def copies(items: list[dict], k: int) -> list[dict]:
    """``items`` ``k`` times over, ids suffixed -0, -1, ... when k > 1: a larger job from a small file, every
    question scored against its gold answers (the texts repeat; nothing in either system caches answers)."""
    if k <= 1:
        return items
    return [{**q, "id": f"{q['id']}-{c}"} for c in range(k) for q in items]


def marginal_rate(n: int, t_n: float, t_2n: float) -> float:
    """N / (T(2N) - T(N)): items per second once the process is up; NaN where T(2N) <= T(N) (noise won)."""
    return n / (t_2n - t_n) if t_2n > t_n else math.nan


# --------------------------------------------------------------------------------------------- models


def random_checkpoint(dst: Path, shape: Shape, tokenizer_dir: Path, seed: int = SEED) -> Path:
    """A random-weight BertForQuestionAnswering of ``shape`` (torch seed ``seed``) saved as transformers does,
    with ``tokenizer_dir``'s vocabulary (vocab.txt, tokenizer.json) and an uncased tokenizer config."""
    os.environ.setdefault("USE_TF", "0")  # transformers 4 imports TensorFlow when it is installed
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=512)
    BertForQuestionAnswering(config).eval().save_pretrained(str(dst))
    for name in ("vocab.txt", "tokenizer.json"):
        shutil.copy(tokenizer_dir / name, dst / name)
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}))
    return dst


def convert(*args: str, log: Path) -> None:
    """``python -m models.convert ARGS`` as a user runs it; its output goes to ``log``."""
    with open(log, "a") as out:
        rc = subprocess.run([sys.executable, "-m", "models.convert", *args], stdout=out, stderr=subprocess.STDOUT,
                            cwd=REPO, check=False).returncode
    if rc:
        raise RuntimeError(f"python -m models.convert {' '.join(args)} failed (exit {rc}); see {log}")


def random_model(work: Path, name: str, tokenizer_dir: Path, calibration: str | None) -> tuple[Path, Path]:
    """(model directory, Hugging Face checkpoint) of the random model ``name``, built once under ``work``.

    Two conversions: checkpoint -> fused fp32 graph (--optimize), then that graph -> the int8 directory
    (--quantize int8: ONNX Runtime's dynamic int8 model.onnx and the NNCF model-int8.xml, both from the fused
    graph), which gets the fused graph as model-fp32.onnx, laid out like the default model's directory.
    """
    root = work / "models" / name
    hf, fp32, model, done = root / "hf", root / "fp32", root / "model", root / "built.json"
    shape = RANDOM_SHAPES[name]
    recipe = {"shape": asdict(shape), "seed": SEED, "calibration": calibration,
              "calibration_questions": CALIBRATION_QUESTIONS}
    if done.exists() and json.loads(done.read_text()) == recipe:
        return model, hf
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    from benchmarks.processes import unpaused_child

    unpaused_child(random_checkpoint, hf, shape, tokenizer_dir)
    log = root / "convert.log"
    windows = ["--max-seq-len", "384", "--doc-stride", "128", "--max-query-len", "64", "--lowercase"]
    convert(str(hf), str(fp32), "--optimize", *windows, log=log)
    convert(str(fp32), str(model), "--quantize", "int8", "--calibration-questions", str(CALIBRATION_QUESTIONS),
            *(["--calibration", calibration] if calibration else []), log=log)
    shutil.copy(fp32 / "model.onnx", model / "model-fp32.onnx")
    done.write_text(json.dumps(recipe))
    print(f"built {name} ({shape.layers} x {shape.hidden}, random weights, seed {SEED}) in "
          f"{time.perf_counter() - t0:.0f} s: {model}", file=sys.stderr, flush=True)
    return model, hf


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One process on one question set: its wall time, and what it answered."""

    questions: int
    seconds: float
    windows: int
    predictions: dict
    stages: dict = field(default_factory=dict)
    load: float = math.nan  # the machine's 1-minute load average as the run ended: neighbours' work shows here
    cpu_seconds: float = math.nan  # user + system of its whole process tree (TreeCpu)
    other_cpu_seconds: float = math.nan  # the machine's busy CPU-s during the run outside that tree (neighbours)


RAY_START_TIMEOUT = "timed out during startup"  # Ray's raylet on an overloaded machine: not the job's failure
START_ATTEMPTS = 3


QUIET_CORES = 0.25  # --quiet-wait: the rest of the machine is quiet below this many busy cores


def machine_busy_seconds() -> float:
    """Busy CPU-seconds of the whole machine since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def wait_for_quiet(max_s: float, window_s: float = 3.0) -> float:
    """Waits until the machine's busy cores over ``window_s`` fall under QUIET_CORES (nothing of ours runs between
    runs, so this is the neighbours), at most ``max_s`` seconds; returns the seconds waited."""
    t0 = time.perf_counter()
    while max_s > 0:
        b0 = machine_busy_seconds()
        time.sleep(window_s)
        busy = (machine_busy_seconds() - b0) / window_s
        waited = time.perf_counter() - t0
        if not busy >= QUIET_CORES or waited >= max_s:
            if waited > 2 * window_s:
                print(f"  waited {waited:.0f} s for a quiet machine (now {busy:.2f} busy cores)", file=sys.stderr,
                      flush=True)
            return waited
    return 0.0


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


def proc_table() -> tuple[dict[int, tuple[str, int]], dict[int, list[int]]]:
    """Every process now: {pid: (start time, utime + stime in ticks)}, and {parent pid: its children}."""
    stats: dict[int, tuple[str, int]] = {}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(entry.name)
            stats[pid] = (fields[19], int(fields[11]) + int(fields[12]))
            children.setdefault(int(fields[1]), []).append(pid)
    return stats, children


class TreeCpu:
    """CPU seconds (user + system) of a process and every process started under it, from /proc (Linux).

    Polled: a process is tracked from the first poll that finds it under the root (or under a tracked one) until
    it exits, so Ray's workers count even after the raylet that started them has gone. What a process spends
    after the last poll before it exits is missed (at most ``interval_s`` of it). On a machine shared with
    other work this is the steadier measure: wall time then includes the other work's turns on the cores."""

    def __init__(self, root: int, interval_s: float = 0.2):
        self.root, self.interval_s = root, interval_s
        self.ticks: dict[tuple[int, str], int] = {}  # (pid, start time): its latest utime + stime
        self._tick = os.sysconf("SC_CLK_TCK")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tracked = {self.root}
        while True:
            stats, children = proc_table()
            todo = [p for p in tracked if p in stats]
            tracked = set(todo)
            while todo:
                for child in children.get(todo.pop(), []):
                    if child not in tracked:
                        tracked.add(child)
                        todo.append(child)
            for pid in tracked:
                start, ticks = stats[pid]
                self.ticks[(pid, start)] = ticks
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.ticks.values()) / self._tick


def timed(cmd: list[str], log: Path, clean: Path | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of its process tree, the machine's other busy CPU seconds meanwhile) of ``cmd``
    as a fresh process, start to exit; raises with the log's tail if it fails. The third is what ran beside it:
    neighbours on a shared machine (and this process's own polling, TreeCpu: a few percent of a core).
    A run whose local Ray did not start in time (an overloaded machine) is run again, up to START_ATTEMPTS
    in all, ``clean`` (its output) removed first; only the run that finished is timed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("USE_TF", "0")
    for attempt in range(1, START_ATTEMPTS + 1):
        if clean is not None:
            shutil.rmtree(clean, ignore_errors=True)
        with open(log, "w") as out:
            busy0 = machine_busy_seconds()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            with TreeCpu(proc.pid) as cpu:
                rc = proc.wait()
            seconds = time.perf_counter() - t0
            other = max(0.0, machine_busy_seconds() - busy0 - cpu.seconds)
        if rc == 0:
            return seconds, cpu.seconds, other
        text = log.read_text(errors="replace")
        if RAY_START_TIMEOUT not in text or attempt == START_ATTEMPTS:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); {log}:\n{text[-2000:]}")
        print(f"  Ray did not start in time (attempt {attempt}); running again: {' '.join(cmd[1:4])}",
              file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def job_run(model_dir: Path, variant: Variant, inputs: Path, out: Path, rows_per_unit: int | None) -> Run:
    """``rows_per_unit`` None: the job's default units."""
    import pyarrow.parquet as pq

    units = ["--rows-per-unit", str(rows_per_unit)] if rows_per_unit else []
    cmd = [sys.executable, "-m", "jobs.answer", "--input", str(inputs), "--output", str(out), "--model",
           str(model_dir), "--address", "local", *units, *variant.flags]
    seconds, cpu, other = timed(cmd, out.with_suffix(".log"), clean=out)
    manifest = json.loads((out / "_manifest.json").read_text())
    stages = manifest["stages"]
    table = pq.read_table(out, columns=["id", "answer"])
    served = manifest.get("precision") or {k: manifest["config"].get(k) for k in ("backend", "precision")}
    return Run(table.num_rows, seconds, int(stages["windows"]), squad.predictions(table),
               {**stages, "served": served, "batch_tokens": manifest.get("batch_tokens")}, load_average(), cpu,
               other)


def bound_run(model_dir: Path, served: dict, batch_tokens: int, inputs: Path, out: Path, processes: int,
              windows: int) -> Run:
    """The answering stage in ``processes`` bare processes (benchmarks/bound.py) as our job served it."""
    cmd = [sys.executable, "-m", "benchmarks.bound", "--input", str(inputs), "--model", str(model_dir),
           "--output", str(out), "--backend", served["backend"], "--precision", served["precision"],
           "--shapes", served.get("shapes", "dynamic"), "--processes", str(processes), "--batch-tokens",
           str(batch_tokens)]
    seconds, cpu, other = timed(cmd, out.with_suffix(".log"))
    predictions = json.loads(out.read_text())
    return Run(len(predictions), seconds, windows, predictions, load=load_average(), cpu_seconds=cpu,
               other_cpu_seconds=other)


def peer_run(hf_dir: Path, inputs: Path, out: Path, threads: int, batch_size: int, windows: dict,
             window_count: int, runtime: str = "torch") -> Run:
    """The pipeline peer on ``runtime`` (benchmarks.peer --runtime); its stages are what the peer says ran."""
    cmd = [sys.executable, "-m", "benchmarks.peer", "--input", str(inputs), "--model", str(hf_dir),
           "--output", str(out), "--runtime", runtime, "--threads", str(threads), "--batch-size", str(batch_size),
           "--windows", json.dumps(windows)]
    seconds, cpu, other = timed(cmd, out.with_suffix(".log"))
    predictions = json.loads(out.read_text())
    return Run(len(predictions), seconds, window_count, predictions, peer_said(out.with_suffix(".log")),
               load=load_average(), cpu_seconds=cpu, other_cpu_seconds=other)


def peer_said(log: Path) -> dict:
    """The ``peer: {...}`` line benchmarks.peer writes to stderr (runtime, precision, threads, load seconds)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("peer: "):
            try:
                return json.loads(line[len("peer: "):])
            except ValueError:
                break
    return {}


@dataclass
class Row:
    """A system on one model: its runs on N and on 2N questions (repeats), and the questions it was scored on."""

    system: str
    n: int
    runs_n: list[Run] = field(default_factory=list)
    runs_2n: list[Run] = field(default_factory=list)

    @property
    def t_n(self) -> float:
        return statistics.median(r.seconds for r in self.runs_n)

    @property
    def t_2n(self) -> float:
        return statistics.median(r.seconds for r in self.runs_2n)

    @property
    def questions_per_s(self) -> float:
        return marginal_rate(self.n, self.t_n, self.t_2n)

    @property
    def c_n(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.runs_n)

    @property
    def c_2n(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.runs_2n)

    @property
    def questions_per_cpu_s(self) -> float:
        """N / (C(2N) - C(N)): questions per CPU-second of the process tree, once it is up."""
        return marginal_rate(self.n, self.c_n, self.c_2n)

    @property
    def windows_per_s(self) -> float:
        extra = self.runs_2n[0].windows - self.runs_n[0].windows
        return marginal_rate(extra, self.t_n, self.t_2n)


# --------------------------------------------------------------------------------------------- report


def header(model: str, n: int, cpus: int) -> str:
    """The line above every table: model, question counts, and the CPU the numbers hold for."""
    from pipeline.cpu import cpu_class

    return (f"{model}, N={n} and 2N={2 * n} SQuAD dev questions; CPU: {cpu_name()} (CPU class {cpu_class()}), "
            f"{cpus} CPUs")


def marginal_table(rows: list[Row], items_2n: list[dict], peer: str | list[str] | None, with_f1: bool) -> str:
    """Markdown: T(N), T(2N), marginal questions/s and windows/s, x each peer's marginal q/s (a column per
    peer of ``peer`` found among ``rows``, in that order; one "x pipeline" column of "-" when none is), the same
    per CPU-second, F1/EM on 2N."""
    names = [peer] if isinstance(peer, str) or peer is None else list(peer)
    bases = [b for b in (next((r for r in rows if r.system == name), None) for name in names) if b is not None]
    heads = [f"x {b.system}" for b in bases] or ["x pipeline"]
    lines = [("| system | T(N) s | T(2N) s | marginal questions/s | marginal windows/s | "
              + " | ".join(heads) + " | CPU-s (N, 2N) | marginal questions per CPU-s | "
              + " | ".join(f"{h} (CPU)" for h in heads) + " | F1 | EM | load avg at end (N, 2N) |"),
             "| --- | ---: | ---: | ---: | ---: | " + "---: | " * len(heads) + "---: | ---: | "
             + "---: | " * len(heads) + "---: | ---: | ---: |"]
    for r in rows:
        ratio = " | ".join(f"{r.questions_per_s / b.questions_per_s:.2f}" for b in bases) or "-"
        cpu_ratio = " | ".join(f"{r.questions_per_cpu_s / b.questions_per_cpu_s:.2f}" for b in bases) or "-"
        if with_f1:
            s = squad.score(items_2n, r.runs_2n[0].predictions)
            f1, em = f"{s['f1']:.2f}", f"{s['exact_match']:.2f}"
        else:
            f1 = em = "-"
        load = ", ".join(f"{statistics.median(x.load for x in runs):.1f}" for runs in (r.runs_n, r.runs_2n))
        lines.append(f"| {r.system} | {r.t_n:.1f} | {r.t_2n:.1f} | {r.questions_per_s:.2f} | "
                     f"{r.windows_per_s:.2f} | {ratio} | {r.c_n:.1f}, {r.c_2n:.1f} | {r.questions_per_cpu_s:.3f} | "
                     f"{cpu_ratio} | {f1} | {em} | {load} |")
    return "\n".join(lines)


def stage_line(row: Row) -> str | None:
    """Our job's actor time on 2N questions (the manifest's stages): tokenize + decode against infer."""
    stages = row.runs_2n[0].stages
    if "infer" not in stages:
        return None
    tok, inf, dec = (stages.get(k, 0.0) for k in ("tokenize", "infer", "decode"))
    total = (tok + inf + dec) or 1.0
    return (f"- {row.system} (served: {served_text(stages.get('served'))}): {stages.get('actors', '?')} actor(s); "
            f"tokenize {tok:.1f} s, infer {inf:.1f} s, "
            f"decode {dec:.1f} s (actor-seconds on 2N): tokenize + decode {100 * (tok + dec) / total:.1f}% "
            f"of actor time; model load {stages.get('model_load', 0.0):.1f} s")


def bound_line(ours: Row, bound: Row) -> str:
    """Our job's marginal rate as a share of the bare processes' (benchmarks/bound.py)."""
    return (f"- {ours.system} answers at {100 * ours.questions_per_s / bound.questions_per_s:.0f}% of the bare "
            f"processes' marginal rate ({ours.questions_per_s:.1f} of {bound.questions_per_s:.1f} q/s): the rest is "
            f"what Ray, the units and staging cost; the bare processes are the most this CPU's kernels allow")


def served_text(served: dict | None) -> str:
    """The manifest's precision record in a few words: the variant, and auto's reason when auto chose."""
    if not served:
        return "?"
    variant = served.get("variant") or served
    text = (f"{variant.get('backend', '?')} {variant.get('precision', '?')}" if isinstance(variant, dict)
            else str(variant))
    if isinstance(variant, dict) and variant.get("shapes", "dynamic") != "dynamic":  # the manifest omits dynamic
        text += f" {variant['shapes']} shapes"
    return f"{text}, requested {served['requested']}" if served.get("requested") else text


# --------------------------------------------------------------------------------------------- the mode


def default_hf_dir(model_dir: Path, hf_model: str | None, hf_weights: str | None, work: Path) -> Path:
    if hf_model:
        return Path(hf_model)
    from benchmarks.processes import unpaused_child
    from benchmarks.systems import hf_model_dir

    dst = work / "models" / "default-hf"
    shutil.rmtree(dst, ignore_errors=True)
    return Path(unpaused_child(hf_model_dir, str(model_dir), str(dst), hf_weights))


def run_model(name: str, model_dir: Path, hf_dir: Path | None, n: int, variants: list[Variant], a, work: Path,
              peer_skip: dict[str, str | None], max_answer_len: int) -> dict:
    """Every variant of our job and the peers on N and 2N questions, repeats interleaved; the table's text.
    ``peer_skip``: runtime (PEERS) -> why that peer is left out, None where it runs."""
    import pyarrow.parquet as pq

    from pipeline.model_dir import load_spec

    items = copies(squad.questions(squad.load_squad(a.data)), getattr(a, "data_copies", 1))[:2 * n]
    if len(items) < 2 * n:
        raise ValueError(f"{a.data} has {len(items)} questions (--data-copies included); {name}={n} needs {2 * n}")
    d = work / "runs" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    inputs = {k: d / f"input-{k}.parquet" for k in (n, 2 * n)}
    for k, path in inputs.items():
        pq.write_table(squad.to_table(items[:k]), path)
    windows = {**asdict(load_spec(model_dir).windows), "max_answer_len": max_answer_len}
    rows = [Row(f"our job, {v.name}", n) for v in variants]
    peer_rows: dict[str, Row] = {}  # runtime -> its row, in PEERS' order
    skipped: list[str] = []
    for runtime, system in PEERS.items():
        why = peer_skip.get(runtime, "not asked for")
        if why is None and hf_dir is None:
            why = "no Hugging Face directory for this model"
        if why is None:
            peer_rows[runtime] = Row(system, n)
        else:
            skipped.append(f"- {system}: not run ({why})")
            print(f"skipping the {system}: {why}", file=sys.stderr, flush=True)
    if peer_rows:  # the pipeline's windows for either runtime: same tokenizer, same settings
        counts = {k: peer_window_count(hf_dir, items[:k], windows) for k in (n, 2 * n)}
    bound_row = Row(BOUND_NAME, n) if a.bound else None
    quiet_s = getattr(a, "quiet_wait", 0) or 0
    # A system's N and 2N runs follow each other, so that its difference is taken under the same neighbours' load;
    # repeats alternate which size runs first.
    for rep in range(a.repeats):
        for v, row in zip(variants, rows):
            wait_for_quiet(quiet_s)
            for k in ((n, 2 * n) if rep % 2 == 0 else (2 * n, n)):
                out = d / f"{rep}-{slug(v.name)}-{k}"
                run = job_run(model_dir, v, inputs[k], out, a.rows_per_unit)
                (row.runs_n if k == n else row.runs_2n).append(run)
                shutil.rmtree(out, ignore_errors=True)
                progress(name, row.system, k, run)
        if bound_row is not None:  # as the first variant served, after it ran
            first = rows[0].runs_n[0].stages
            served = first["served"].get("variant") or first["served"]
            variant = {k: v for k, v in served.items() if k in ("backend", "precision", "shapes")}
            bound_row.system = f"{BOUND_NAME} ({served_text(variant)})"
            wait_for_quiet(quiet_s)
            for k in ((n, 2 * n) if rep % 2 == 0 else (2 * n, n)):
                out = d / f"{rep}-bound-{k}.json"
                runs = rows[0].runs_n if k == n else rows[0].runs_2n
                run = bound_run(model_dir, served, first["batch_tokens"], inputs[k], out, a.cpus, runs[0].windows)
                (bound_row.runs_n if k == n else bound_row.runs_2n).append(run)
                progress(name, bound_row.system, k, run)
        for runtime, peer_row in peer_rows.items():
            wait_for_quiet(quiet_s)
            for k in ((n, 2 * n) if rep % 2 == 0 else (2 * n, n)):
                out = d / f"{rep}-peer-{runtime}-{k}.json"
                run = peer_run(hf_dir, inputs[k], out, a.cpus, a.hf_batch_size, windows, counts[k], runtime)
                (peer_row.runs_n if k == n else peer_row.runs_2n).append(run)
                progress(name, peer_row.system, k, run)
    all_rows = rows + ([bound_row] if bound_row else []) + list(peer_rows.values())
    label = f"{name} ({model_dir})" if name == "default" else f"{name} (random weights, {model_dir})"
    notes = [*filter(None, (stage_line(r) for r in rows)), *([bound_line(rows[0], bound_row)] if bound_row else []),
             *(peer_line(r) for r in peer_rows.values()), *skipped, neighbours_line(all_rows)]
    text = "\n".join([header(label, n, os.cpu_count() or 1), "",
                      marginal_table(all_rows, items, list(PEERS.values()), name == "default"), "", *notes])
    scored = items if name == "default" else None  # random weights answer at random: no F1
    return {"text": text, "n": n, "rows_per_unit": a.rows_per_unit,
            "rows": [row_report(r, scored) for r in all_rows]}


def neighbours_line(rows: list[Row]) -> str:
    """The machine's busy CPU-seconds outside each system's process tree during its runs (Run.other_cpu_seconds):
    near 0 on a quiet machine; where a system's runs had neighbours, its times (wall and CPU) are suspect."""
    parts = []
    for r in rows:
        others = [x.other_cpu_seconds for x in r.runs_n + r.runs_2n]
        parts.append(f"{r.system} {statistics.median(others):.1f} / {max(others):.1f}")
    return ("- CPU-s outside the measured process trees per run (neighbours, and this benchmark's own polling), "
            "median / max: " + "; ".join(parts))


def peer_line(row: Row) -> str:
    """What a peer says ran in its first 2N run (benchmarks.peer's ``peer:`` line): runtime, precision, threads,
    and the seconds its model load (export and compile, for OpenVINO) and its answering took in the process."""
    said = row.runs_2n[0].stages
    if not said:
        return f"- {row.system}: (the peer wrote no peer: line)"
    runtime = (f"OpenVINO {said.get('openvino', '?')} via optimum-intel, inference precision "
               f"{said.get('INFERENCE_PRECISION_HINT', '?')}, INFERENCE_NUM_THREADS "
               f"{said.get('INFERENCE_NUM_THREADS', '?')}, {said.get('PERFORMANCE_HINT', '?')} hint, "
               f"{said.get('NUM_STREAMS', '?')} stream(s)" if said.get("runtime") == "openvino"
               else f"PyTorch {said.get('torch', '?')} eager fp32, {said.get('threads', '?')} threads")
    return (f"- {row.system} ({runtime}; batch {said.get('batch_size', '?')}): in its first 2N run, model load "
            f"{said.get('load_s', math.nan):.1f} s, answering {said.get('answer_s', math.nan):.1f} s")


def peer_window_count(hf_dir: Path, items: list[dict], windows: dict) -> int:
    """Windows the pipeline cuts for these questions (its tokenizer, our settings), counted here, untimed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    enc = tok([q["question"] for q in items], [q["context"] for q in items], truncation="only_second",
              max_length=windows["max_seq_len"], stride=windows["doc_stride"], return_overflowing_tokens=True)
    return len(enc["input_ids"])


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-") or "default"


def progress(model: str, system: str, k: int, run: Run) -> None:
    print(f"  {model}: {system}, {k} questions: {run.seconds:.1f} s, {run.cpu_seconds:.1f} CPU-s (load average "
          f"{run.load:.1f})", file=sys.stderr, flush=True)


def row_report(r: Row, items_2n: list[dict] | None = None) -> dict:
    """Every number of a row; F1 and EM on the 2N questions where ``items_2n`` is given."""
    score = squad.score(items_2n, r.runs_2n[0].predictions) if items_2n else {}
    return {"system": r.system, "f1": score.get("f1"), "exact_match": score.get("exact_match"), "n": r.n,
            "t_n": r.t_n, "t_2n": r.t_2n, "questions_per_s": r.questions_per_s,
            "windows_per_s": r.windows_per_s, "seconds_n": [x.seconds for x in r.runs_n],
            "seconds_2n": [x.seconds for x in r.runs_2n], "cpu_seconds_n": [x.cpu_seconds for x in r.runs_n],
            "cpu_seconds_2n": [x.cpu_seconds for x in r.runs_2n], "questions_per_cpu_s": r.questions_per_cpu_s,
            "load_n": [x.load for x in r.runs_n],
            "other_cpu_seconds_n": [x.other_cpu_seconds for x in r.runs_n],
            "other_cpu_seconds_2n": [x.other_cpu_seconds for x in r.runs_2n],
            "load_2n": [x.load for x in r.runs_2n], "windows": [r.runs_n[0].windows, r.runs_2n[0].windows],
            "stages_2n": r.runs_2n[0].stages}


def main(a, job_model: str, max_answer_len: int) -> dict:
    """The mode: every model of --models, each table printed as soon as it is measured."""
    from benchmarks.systems import optimum_intel_available, transformers_pipeline_available

    variants = parse_variants(a.variants)
    models = parse_models(a.models)
    work = Path(a.work_dir or REPO / "out" / "benchmark-marginal")
    work.mkdir(parents=True, exist_ok=True)
    skip = set(getattr(a, "skip_peer", None) or ())
    peer_skip = {"torch": "--skip-peer torch" if "torch" in skip else transformers_pipeline_available(),
                 "openvino": "--skip-peer openvino" if "openvino" in skip else optimum_intel_available()}
    need_hf = any(why is None for why in peer_skip.values())
    default_dir = Path(job_model)
    report: dict = {"cpu": cpu_name(), "variants": [v.name for v in variants], "models": {}}
    t0 = time.perf_counter()
    for name, n in models:
        if name == "default":
            model_dir = default_dir
            hf_dir = default_hf_dir(model_dir, a.hf_model, a.hf_weights, work) if need_hf else None
        else:
            model_dir, hf_dir = random_model(work, name, DEFAULT_MODEL, a.calibration)
        result = run_model(name, model_dir, hf_dir, n, variants, a, work, peer_skip, max_answer_len)
        report["models"][name] = result
        print(result["text"] + "\n", flush=True)
    report["seconds"] = time.perf_counter() - t0
    print(f"whole run: {report['seconds'] / 60:.1f} min", flush=True)
    return report
