"""A row's answer is a function of the row: the default model, in the variant --precision auto serves on this
machine's CPU class, answers the same 300 SQuAD dev questions identically whatever the token budget (how rows are
batched) and the rows per unit (which rows share a call)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import REPO

from pipeline import squad

DEV = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json"
MODEL = REPO / "models" / "minilm-squad"


def auto_variant():
    """What auto serves for the default model on this machine alone (pipeline.auto, for this node's CPU)."""
    from pipeline.auto import auto_choice
    from pipeline.precision import NodeCpu

    return auto_choice(str(MODEL), "auto", [NodeCpu.here()])


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/squad/dev-v1.1.json")
def test_auto_variant_answers_do_not_depend_on_the_batching():
    from pipeline.answer import Answerer
    from pipeline.served import open_variant

    choice = auto_variant()
    items = squad.questions(squad.load_squad(DEV), 300)
    table = pa.table({"question": [r["question"] for r in items], "context": [r["context"] for r in items]})
    spec, session = open_variant(str(MODEL), choice.variant)
    seen = {}
    for budget in (512, 4096):
        answerer = Answerer(spec, session, batch_tokens=budget)
        for rows in (16, 1024):
            out = pa.concat_tables([answerer(table.slice(i, rows)) for i in range(0, table.num_rows, rows)])
            seen[(budget, rows)] = list(zip(out.column("answer").to_pylist(), out.column("answer_start").to_pylist(),
                                            out.column("answer_end").to_pylist()))
    first = seen[(512, 16)]
    changed = {k: sum(a != b for a, b in zip(first, v)) for k, v in seen.items()}
    assert all(n == 0 for n in changed.values()), (str(choice.variant), changed)
    assert sum(a is not None for a, _, _ in first) == 300
