"""Poison rows: a row that crashes the model process every time costs only itself. Its read unit is split until
the row stands alone, the row gets error "crashed the model process", every other row is answered, and the job
ends. The split planning and the rows written for a crashed row are tested without Ray."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_exactly_once import job, write_input

from pipeline.commit import ROW_COLUMN, UNIT_COLUMN
from pipeline.poison import (
    CRASHED,
    MIN_PIECE_ROWS,
    Piece,
    after_crashes,
    crashed_rows,
    first_pass,
    restart_budget,
    unstaged,
    whole,
)
from pipeline.units import ReadUnit, UnitReader

ANSWERS = ["answer", "answer_start", "answer_end"]
JOB_TIMEOUT_S = 600  # a crash retried without limit never ends; these jobs end in about a minute
pytestmark = pytest.mark.usefixtures("joined_ray")  # jobs join the suite's Ray node (conftest)
CONTEXTS = ["The king of France was born in Paris in 1789.", "The river runs by the city in the year one."]


def documents(n: int) -> pa.Table:
    return pa.table({"id": [f"r{i:03d}" for i in range(n)], "question": [f"who is the king {i}?" for i in range(n)],
                     "context": [CONTEXTS[i % 2] for i in range(n)]})


def run(args: list[str], env_extra: dict) -> tuple[int, str, float]:
    """A job in a subprocess: exit code, output, seconds; a job that loops on a crash fails the test here."""
    t0 = time.monotonic()
    p = job(args, env_extra)
    try:
        out, _ = p.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return p.returncode, out, time.monotonic() - t0


# -- split planning: pure -----------------------------------------------------------------------------------

def test_a_poison_row_is_cut_out_in_log2_passes():
    """Halves of the pieces that crash, recursively: after 1 + ceil(log2 R) passes only the poison row is left;
    the pieces answered and the row written cover the unit once, in order."""
    unit = ReadUnit(7, "in.parquet", 0, 100, 7)
    poison = 3  # row inside the unit
    pieces, answered, crashed, passes = [whole(unit)], [], [], 0
    while pieces:
        passes += 1
        failed = [p for p in pieces if p.start <= poison < p.start + p.length]
        answered += [p for p in pieces if p not in failed]
        pieces, rows = after_crashes(failed)
        crashed += rows
    assert passes == 4  # 7 rows: 7 -> 3 -> 2 -> 1
    assert crashed == [Piece(unit, 3, 1)] and crashed[0].read_unit == ReadUnit(7, "in.parquet", 0, 103, 1)
    rows = sorted(r for p in answered + crashed for r in range(p.start, p.start + p.length))
    assert rows == list(range(7))
    assert {p.read_unit.index for p in answered} == {7}  # pieces keep their unit's index: its output files


def test_halves_and_bad_pieces():
    unit = ReadUnit(0, "f", 0, 0, 5)
    assert whole(unit).halves() == (Piece(unit, 0, 2), Piece(unit, 2, 3))
    assert Piece(unit, 2, 3).halves() == (Piece(unit, 2, 1), Piece(unit, 3, 2))
    assert after_crashes([Piece(unit, 4, 1)]) == ([], [Piece(unit, 4, 1)])
    with pytest.raises(ValueError, match="cannot be split"):
        Piece(unit, 4, 1).halves()
    with pytest.raises(ValueError, match="not inside unit 0"):
        Piece(unit, 3, 3)


def test_unstaged_pieces_and_leftovers():
    """Staged parts (unit, first output row, rows) against a pass's pieces; with fan-out 2 rows per input row."""
    u0, u1 = ReadUnit(0, "f", 0, 0, 4), ReadUnit(1, "f", 0, 4, 4)
    a, b = whole(u0).halves()
    pieces = [a, b, whole(u1)]
    assert unstaged(pieces, [(0, 0, 2), (0, 2, 2), (1, 0, 4)]) == ([], [])
    assert unstaged(pieces, [(0, 0, 4), (1, 0, 4)]) == ([], [])  # one block that held both halves
    assert unstaged(pieces, [(0, 0, 2), (1, 0, 4)]) == ([b], [])  # b crashed its actor
    # u1's task died between two blocks: its first block is staged, and must go before u1 is cut in halves
    assert unstaged(pieces, [(0, 0, 2), (0, 2, 2), (1, 0, 3)]) == ([whole(u1)], [(1, 0, 3)])
    # fan-out: piece b's 2 input rows are output rows 4..7 of unit 0
    assert unstaged([a, b], [(0, 0, 4), (0, 4, 4)], rows_per_input_row=2) == ([], [])
    assert unstaged([a, b], [(0, 0, 4), (0, 4, 3)], rows_per_input_row=2) == ([b], [(0, 4, 3)])


def covers_once(pieces: list[Piece], units: list[ReadUnit]) -> bool:
    """Every row of every unit in exactly one piece, pieces in unit order and contiguous."""
    at = {u.index: 0 for u in units}
    for p in pieces:
        if p.start != at[p.unit.index]:
            return False
        at[p.unit.index] += p.length
    return all(at[u.index] == u.length for u in units)


def test_first_pass_shrinks_pieces_towards_its_end():
    """One 1000-row unit on 2 actors: a quarter first, then ever smaller pieces, none below the minimum, so
    that the last piece an actor takes is short; 4 actors start on smaller ones."""
    unit = ReadUnit(0, "f", 0, 0, 1000)
    pieces = first_pass([unit], 2)
    sizes = [p.length for p in pieces]
    assert covers_once(pieces, [unit])
    assert sizes == [250, 188, 141, 106, 79, 59, 45, 33, 25, 19, 16, 16, 23]  # 1/4 of what is left, then the minimum
    assert MIN_PIECE_ROWS == 16  # the last 23: no sliver of 7 rows at the unit's end
    assert [p.length for p in first_pass([unit], 4)][:2] == [125, 110]
    assert first_pass([ReadUnit(0, "f", 0, 0, 31)], 8) == [whole(ReadUnit(0, "f", 0, 0, 31))]  # too short to cut


def test_first_pass_cuts_only_the_last_units_of_a_large_job():
    """100 units of 1024 rows on 4 actors: whole until the rows left are about 8 units' worth, then cut."""
    units = [ReadUnit(i, "f", 0, 1024 * i, 1024) for i in range(100)]
    pieces = first_pass(units, 4)
    assert covers_once(pieces, units)
    cut = sorted({p.unit.index for p in pieces if p.length < 1024})
    assert cut and cut[0] >= 90 and pieces[:cut[0]] == [whole(u) for u in units[:cut[0]]]
    assert pieces[-1].length >= MIN_PIECE_ROWS and len(pieces) < 200


def test_restart_budget():
    assert restart_budget(1) == restart_budget(100) == 30  # 3 crashes for each of 10 poison pieces
    assert restart_budget(1000) == 300  # or of 10% of the pieces


# -- what actors and the driver stage: no cluster --------------------------------------------------------------

@pytest.fixture(scope="module")
def fanout_job(tiny_model, tmp_path_factory):
    """An input file, a questions table and actor settings for the tiny model."""
    from jobs.ray_stage import ActorSettings
    from pipeline.config import Columns, DecodeSettings
    from pipeline.fanout import QUESTION
    from pipeline.served import serve

    base = tmp_path_factory.mktemp("pieces")
    docs = documents(6).drop_columns(["question"])
    pq.write_table(docs, base / "docs.parquet")
    questions = pa.table({"question_id": ["who", "when"], "question": ["who is the king?", "when was he born?"]})

    def settings(wide: bool = False, top_k: int = 1) -> ActorSettings:
        return ActorSettings(serve(str(tiny_model), batch_tokens=4096), 1, Columns("id", QUESTION, "context"),
                             DecodeSettings(top_k=top_k), wide)
    return base / "docs.parquet", questions, settings


def test_a_piece_stages_its_rows_at_its_offset_in_the_unit(fanout_job):
    """An actor answers a piece (rows 2..3 of a 6-row unit) as those input rows, numbered from the piece's first
    output row inside the unit: 2 plainly, 4 with two questions per row."""
    from jobs.ray_stage import AnswerActor

    path, questions, settings = fanout_job
    piece = Piece(ReadUnit(5, str(path), 0, 0, 6), 2, 2)
    actor = AnswerActor(pafs.LocalFileSystem(), settings(), questions)
    out = actor.answer(pa.Table.from_pylist([piece.as_row(questions.num_rows)]))
    assert out.column("id").to_pylist() == ["r002", "r002", "r003", "r003"]
    assert out.column(UNIT_COLUMN).to_pylist() == [5] * 4 and out.column(ROW_COLUMN).to_pylist() == [4, 5, 6, 7]
    wide = AnswerActor(pafs.LocalFileSystem(), settings(wide=True), questions)
    out = wide.answer(pa.Table.from_pylist([piece.as_row(1)]))
    assert out.column("id").to_pylist() == ["r002", "r003"] and out.column(ROW_COLUMN).to_pylist() == [2, 3]


@pytest.mark.parametrize(("fan_out", "wide", "top_k"), [(False, False, 1), (False, False, 2), (True, False, 1),
                                                        (True, True, 1)])
def test_crashed_rows_have_the_answered_rows_schema(fanout_job, tiny_model, fan_out, wide, top_k):
    """The driver's rows for a crashed input row: the answering stage's schema, no answer, the error; with
    fan-out one per question, wide one per document."""
    from jobs.ray_stage import ActorSettings, AnswerActor
    from pipeline.config import Columns, DecodeSettings
    from pipeline.served import serve

    path, questions, settings = fanout_job
    unit = ReadUnit(0, str(path), 0, 0, 1)
    if fan_out:
        actor = AnswerActor(pafs.LocalFileSystem(), settings(wide, top_k), questions)
    else:
        pq.write_table(documents(1), path.parent / "plain.parquet")
        unit = ReadUnit(0, str(path.parent / "plain.parquet"), 0, 0, 1)
        plain = ActorSettings(serve(str(tiny_model), batch_tokens=4096), 1, Columns(), DecodeSettings(top_k=top_k))
        actor = AnswerActor(pafs.LocalFileSystem(), plain)
    answered = actor.answer(pa.Table.from_pylist([unit.as_row()])).drop_columns([UNIT_COLUMN, ROW_COLUMN])
    docs = UnitReader(pafs.LocalFileSystem()).read(unit)
    crashed = crashed_rows(docs, questions if fan_out else None, wide, top_k)
    assert crashed.schema.equals(answered.schema, check_metadata=False)
    assert crashed.num_rows == answered.num_rows == (2 if fan_out and not wide else 1)
    assert crashed.column("error").to_pylist() == [CRASHED] * crashed.num_rows
    assert crashed.select(docs.column_names).equals(answered.select(docs.column_names))
    no_answer = [c for c in crashed.column_names if c.startswith(("answer", "score", "probability", "top_"))]
    assert no_answer and all(crashed.column(c).null_count == crashed.num_rows for c in no_answer)


# -- the whole job on a local Ray ------------------------------------------------------------------------------


def test_a_row_that_crashes_the_model_process_costs_only_itself(tiny_model, tmp_path):
    """40 rows in units of 4; the row r017 crashes its actor process every time. The job exits 0 with every
    row once, r017 with the crash error and no answer, every other row answered as the pure stage answers it,
    and the manifest names r017."""
    from pipeline.answer import Answerer
    from pipeline.backends import load_model

    src = write_input(tmp_path / "in", 40)  # two files of 2 row groups of 10 rows; r005 has no question
    table = pa.concat_tables([pq.read_table(src / "a.parquet"), pq.read_table(src / "b.parquet")])
    out = tmp_path / "out"
    code, text, seconds = run(["--input", str(src), "--output", str(out), "--model", str(tiny_model),
                               "--rows-per-unit", "4", "--concurrency", "2"], {"QA_FAULT_CRASH_ON_ROW": "r017"})
    assert code == 0, text[-4000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    result = pa.concat_tables([pq.read_table(out / f["path"]) for f in manifest["output_files"]]).sort_by("id")
    assert result.column("id").to_pylist() == table.column("id").to_pylist()  # every row, once
    rows = {r["id"]: r for r in result.to_pylist()}
    assert rows["r017"]["error"] == CRASHED and all(rows["r017"][c] is None for c in ANSWERS + ["score"])
    spec, session = load_model(str(tiny_model))
    pure = Answerer(spec, session)(table)
    others = [i for i in range(40) if i != 17]
    for column in ANSWERS:
        assert result.column(column).take(others).equals(pure.column(column).take(others)), column
    scored = [i for i in others if i != 5]
    assert result.column("score").take(scored).to_pylist() == pytest.approx(
        pure.column("score").take(scored).to_pylist(), rel=1e-5)
    assert rows["r005"]["error"] == "question is null"
    assert manifest["errors"] == 2 and manifest["rows_out"] == 40
    retries = manifest["retries"]
    # unit 4 (rows 16..19) -> halves (16..17 crashes) -> single rows (17 crashes): 3 passes, 2 + 2 pieces again.
    # The first pass keeps two pieces in flight per actor: a piece queued behind unit 4 on its actor may fail
    # with it and come back in halves in pass 2 (2 more pieces, both staged there, one in flight each)
    assert retries["crashed_rows"] == ["r017"] and retries["passes"] == 3 and retries["pieces_retried"] in (4, 6)
    assert retries["actor_restarts"] >= 6  # 3 crashes a pass; the restart after the last may not have come yet
    # Ray's own lines about the crashes (tasks retried, workers died) stay in the job's log file, named once
    assert "(raylet)" not in text and "\x1b[" not in text and "retries remaining" not in text, text
    note = re.search(r"note: Ray sent the job \d+ message\(s\) while it ran \(.*task\(s\) retried.*\), in (\S+);", text)
    assert note, text
    log = Path(note.group(1))
    assert "(raylet) " in log.read_text() and "retries remaining" in log.read_text()
    log.unlink()
    print(f"poison-row job: {seconds:.1f} s")


def test_a_python_error_in_an_actor_still_fails_the_job(tiny_model, tmp_path):
    """An exception in an actor (here: a row group that cannot be decoded) is not a crash: the job fails naming
    the file, rather than splitting the unit and writing its rows as crashed."""
    src = tmp_path / "in"
    src.mkdir()
    bad = src / "bad.parquet"
    pq.write_table(documents(8), bad, row_group_size=4, compression="none")
    data = bytearray(bad.read_bytes())
    data[4:40] = b"\xff" * 36  # the first page header: the footer (all that planning reads) is intact
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, text, _ = run(["--input", str(src), "--output", str(out), "--model", str(tiny_model),
                         "--rows-per-unit", "4", "--concurrency", "1"], {})
    assert code == 1 and f"error: input file {bad}, row group 0" in text, text[-4000:]
    assert not (out / "_manifest.json").exists() and CRASHED not in text


def test_a_model_that_keeps_crashing_stops_the_job_and_resume_finishes_it(tiny_model, tmp_path):
    """Past a pass's restart budget (lowered to 1 by QA_FAULT_RESTART_BUDGET) a restarted actor loads no model:
    the job stops with a one-line error instead of cutting units down to single rows; what was staged stays,
    and --mode resume (the fault gone) answers the rest, every row once."""
    table = documents(8)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(table, src / "a.parquet")
    out = tmp_path / "out"
    common = ["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--rows-per-unit", "4",
              "--concurrency", "1"]
    code, text, _ = run(common, {"QA_FAULT_CRASH_ON_ROW": "r005", "QA_FAULT_RESTART_BUDGET": "1"})
    assert code == 1 and "error: the model process crashed 2 times in one pass" in text, text[-4000:]
    assert "--mode resume" in text and not (out / "_manifest.json").exists()
    # Unit 0 is staged unless the actor took unit 1 (queued beside it in the first pass) first and crashed out of
    # its budget before answering unit 0: which of the two it starts with is Ray Data's order, not ours.
    staged = sorted(p.name for p in (out / "_staging").glob("part-*.parquet"))
    assert all("-000000-" in name for name in staged), staged  # only unit 0 can have staged
    code, text, _ = run(common + ["--mode", "resume"], {})
    assert code == 0, text[-4000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    result = pa.concat_tables([pq.read_table(out / f["path"]) for f in manifest["output_files"]]).sort_by("id")
    assert result.column("id").to_pylist() == table.column("id").to_pylist() and manifest["errors"] == 0
    kept = 1 if staged else 0  # what was staged stays, and only the rest is answered
    assert manifest["units_answered_now"] == 2 - kept and manifest["rows_staged_before"] == 4 * kept
