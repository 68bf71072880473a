"""models.train_qa and models.export_qa on a tiny base encoder: window labels, exact resume, export, warm start.

Needs the train extra (torch, transformers, safetensors); skips without it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from tiny_models import vocab_tokens, write_tokenizer_json, write_vocab

torch = pytest.importorskip("torch", reason="training needs the train extra: pip install torch==2.13.0 -e .[train]")
pytest.importorskip("transformers")

from models import export_qa, train_qa
from models.train_qa import TrainConfig, build_windows, epoch_batches, train
from pipeline.answer import Answerer
from pipeline.backends import load_model
from pipeline.model_dir import load_spec
from pipeline.windows import load_tokenizer, make_windows

CONTEXTS = [
    "the king of france was born in paris in 1789 , the first year of the war . " * 3
    + "the queen was born in the city by the river in 1790 .",
    "the cafe naive is on the river . who is at the cafe ? the king and the queen .",
]
QAS = [(0, "where was the king born ?", "paris"), (0, "when was the queen born ?", "1790"),
       (0, "who was born in paris ?", "the king of france"), (1, "what is on the river ?", "the cafe naive"),
       (1, "who is at the cafe ?", "the king and the queen"), (0, "which year was the war ?", "1789"),
       (0, "who was born in paris in the first year of the war ?", "the king of france")]  # > max_query_len


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random-weight BERT encoder saved as the MiniLM base is: config.json, model.safetensors, tokenizer."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab_tokens()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(d))
    write_tokenizer_json(d)
    # As in MiniLM's tokenizer.json, the specials are added tokens: "[SEP]" in a text matches one unless the
    # tokenizer is told to encode special tokens as text (the job's does).
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(vocab_tokens()[:5])
    tok.save(str(d / "tokenizer.json"))
    write_vocab(d)
    return d


def write_squad(path, contexts, qas):
    paragraphs = [{"context": c, "qas": [{"id": f"q{i}", "question": q,
                                         "answers": [{"text": a, "answer_start": c.index(a)}]}
                                        for i, (ci, q, a) in enumerate(qas) if ci == k]}
                  for k, c in enumerate(contexts)]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    return write_squad(tmp_path_factory.mktemp("squad") / "train.json", CONTEXTS, QAS)


def config(base, squad_file, workdir, **kw) -> TrainConfig:
    settings = {"max_seq_len": 32, "doc_stride": 8, "max_query_len": 8, "batch_size": 4, "epochs": 3.0,
                "chunk_batches": 2, "lr": 1e-3, **kw}
    return TrainConfig(base=str(base), train_file=str(squad_file), workdir=str(workdir), **settings)


def test_windows_follow_run_squad_and_label_the_answer(base, squad_file, tmp_path):
    """Each question's windows start at context tokens 0, s, 2s, ... (s = doc_stride) until one reaches the end;
    a window holding the whole answer labels exactly its tokens, the others point at [CLS]."""
    from tokenizers import Tokenizer

    cfg = config(base, squad_file, tmp_path)
    windows = build_windows(cfg)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    w = 0
    for ci, question, answer in sorted(QAS, key=lambda qa: qa[0]):  # file order: paragraph by paragraph
        q_ids = tok.encode(question, add_special_tokens=False).ids[: cfg.max_query_len]
        c_ids = tok.encode(CONTEXTS[ci], add_special_tokens=False).ids
        a_ids = tok.encode(answer, add_special_tokens=False).ids
        room = cfg.max_seq_len - len(q_ids) - 3
        at = next(i for i in range(len(c_ids)) if c_ids[i : i + len(a_ids)] == a_ids)  # answer_start's occurrence
        labelled = 0
        for start in range(0, len(c_ids), cfg.doc_stride):
            ids = windows["ids"][windows["offsets"][w] : windows["offsets"][w + 1]].tolist()
            part = c_ids[start : start + room]
            assert ids == [2, *q_ids, 3, *part, 3], (question, start)
            s, e = int(windows["start"][w]), int(windows["end"][w])
            if start <= at and at + len(a_ids) <= start + len(part):
                labelled += 1
                first = len(q_ids) + 2 + at - start
                assert (s, e) == (first, first + len(a_ids) - 1), (question, start)
            else:
                assert (s, e) == (0, 0), (question, start)
            w += 1
            if start + room >= len(c_ids):
                break
        assert labelled >= 1, question
    assert w == len(windows["lengths"])


def test_batches_are_a_pure_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(10, 200, 1000).astype(np.int32)
    a, b = epoch_batches(lengths, 32, 4, seed=13, epoch=1), epoch_batches(lengths, 32, 4, seed=13, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))  # every window once per epoch
    other = epoch_batches(lengths, 32, 4, seed=13, epoch=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))
    spread = np.median([np.ptp(lengths[x]) for x in a])
    assert spread < np.ptp(lengths) / 4  # batches are cut from length-sorted chunks


def test_stopped_and_resumed_training_equals_one_run(base, squad_file, tmp_path):
    """Same data order, schedule, optimizer moments and dropout RNG: a resumed run ends bit-for-bit where an
    uninterrupted one does."""
    one = config(base, squad_file, tmp_path / "one")
    train(one, budget_minutes=10, threads=1)
    two = config(base, squad_file, tmp_path / "two")
    train(two, budget_minutes=10, threads=1, stop_at_step=3)
    assert json.loads((tmp_path / "two" / "progress.json").read_text())["step"] == 3
    train(two, budget_minutes=10, threads=1)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] > 3
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    trained = {k.removeprefix("bert."): v for k, v in a["model"].items()}
    assert any(not torch.equal(trained[k], v) for k, v in _base_weights(base).items())  # it did train


def _base_weights(base) -> dict:
    from safetensors.torch import load_file

    return load_file(str(base / "model.safetensors"))


def test_export_serves_the_trained_weights_and_warm_starts(base, squad_file, tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering

    cfg = config(base, squad_file, tmp_path / "work")
    train(cfg, budget_minutes=10, threads=1, stop_at_step=4)
    dst = tmp_path / "model"
    export_qa.main(["--weights", str(tmp_path / "work" / "checkpoint.pt"), "--dst", str(dst), "--base", str(base),
                    "--fp32", "--name", "tiny-qa"])
    assert {p.name for p in dst.iterdir()} >= {"model.onnx", "model-fp32.onnx", "tokenizer.json", "vocab.txt",
                                              "config.json", "qa_spec.json", "weights-bf16.safetensors",
                                              "training.json"}
    record = json.loads((dst / "training.json").read_text())
    assert record["step"] == 4 and record["train_config"]["max_seq_len"] == 32

    # The fp32 graph gives the trained torch model's logits; the int8 graph is close to them.
    state = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)["model"]
    model = BertForQuestionAnswering(BertConfig.from_pretrained(str(base)))
    model.load_state_dict(state)
    model.eval()
    ids = torch.randint(5, len(vocab_tokens()), (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    scale = float(out.start_logits.abs().max())
    for graph, tol in (("model-fp32.onnx", 1e-4), ("model.onnx", 0.1 * scale)):  # int8: measured ~0.01 x scale
        spec, session = load_model(str(dst / graph))
        start, end = session.run(ids.numpy(), mask.numpy(), types.numpy())
        keep = mask.numpy().astype(bool)
        assert np.abs(start - out.start_logits.numpy())[keep].max() <= tol, graph
        assert np.abs(end - out.end_logits.numpy())[keep].max() <= tol, graph
    spec, session = load_model(str(dst))
    rows = Answerer(spec, session)(pa.table({"question": [q for _, q, _ in QAS],
                                             "context": [CONTEXTS[c] for c, _, _ in QAS]})).to_pylist()
    assert all(r["error"] is None and CONTEXTS[c][r["answer_start"]:r["answer_end"]] == r["answer"]
               for r, (c, _, _) in zip(rows, QAS))

    # A warm start from the exported weights continues the schedule at the recorded step.
    warm = config(base, squad_file, tmp_path / "warm", init_weights=str(dst / "weights-bf16.safetensors"))
    train(warm, budget_minutes=10, threads=1, stop_at_step=6)
    assert json.loads((tmp_path / "warm" / "progress.json").read_text())["step"] == 6


# "[SEP]" typed in a question or a context is text to the job (pipeline.windows): training must cut it the same way.
SEP_CONTEXTS = [*CONTEXTS, "the sign at the cafe said [SEP] . the king was at the [SEP] cafe in 1790 ."]
SEP_QAS = [*QAS, (2, "who was at the [SEP] cafe ?", "the king"), (2, "what did the sign say ?", "[SEP]")]


@pytest.fixture(scope="module")
def served(base, tmp_path_factory):
    """A model directory as models.export_qa writes it from random QA weights: the tokenizer the job serves."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForQuestionAnswering

    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(1)
    model = BertForQuestionAnswering(BertConfig.from_pretrained(str(base)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "weights.safetensors"))
    export_qa.main(["--weights", str(d / "weights.safetensors"), "--dst", str(d / "model"), "--base", str(base)])
    return d / "model"


def test_training_windows_are_the_serving_windows(base, served, tmp_path):
    """Token for token, the windows training learns from are those the job cuts from the exported model directory
    for the same questions (ids, type ids, lengths), and each label spans the answer in the served offsets."""
    cfg = config(base, write_squad(tmp_path / "train.json", SEP_CONTEXTS, SEP_QAS), tmp_path)
    got = build_windows(cfg)
    spec = load_spec(served)
    questions = [q for _, q, _ in sorted(SEP_QAS, key=lambda qa: qa[0])]  # file order: paragraph by paragraph
    answers = [(SEP_CONTEXTS[c], a) for c, _, a in sorted(SEP_QAS, key=lambda qa: qa[0])]
    want, errors = make_windows(load_tokenizer(spec.tokenizer_file, spec.lowercase), questions,
                                [c for c, _ in answers], cfg.window_settings)
    assert not errors
    sep = load_tokenizer(spec.tokenizer_file, spec.lowercase).token_to_id("[SEP]")
    w = 0
    for i, (context, answer) in enumerate(answers):
        mine = np.flatnonzero(want.row == i)  # the job's windows of question i, in order
        labelled = 0
        for k in mine:
            n = int(want.lengths[k])
            a, b = got["offsets"][w], got["offsets"][w + 1]
            assert got["lengths"][w] == n == b - a, (questions[i], k)
            assert got["ids"][a:b].tolist() == want.input_ids[k, :n].tolist(), (questions[i], k)
            assert got["types"][a:b].tolist() == want.token_type_ids[k, :n].tolist(), (questions[i], k)
            assert got["ids"][a:b].tolist().count(sep) == 2, questions[i]  # the two separators, not the text
            s, e = int(got["start"][w]), int(got["end"][w])
            if (s, e) != (0, 0):
                labelled += 1
                assert want.context_mask[k, s] and want.context_mask[k, e], (questions[i], k)
                assert context[want.offsets[k, s, 0]:want.offsets[k, e, 1]] == answer, (questions[i], k)
            w += 1
        assert labelled >= 1, questions[i]
    assert w == len(got["lengths"]) == len(want)
    assert max(np.bincount(want.row)) >= 3  # the long context was cut into several windows
    assert "[SEP]" in questions[-2] and "[SEP]" in answers[-1][1]


def test_training_windows_do_not_depend_on_the_batch_size(base, squad_file, tmp_path, monkeypatch):
    """Cut in batches of 3 questions (window rows restart at 0 in every batch), the arrays are the same."""
    cfg = config(base, squad_file, tmp_path)
    whole = build_windows(cfg)
    monkeypatch.setattr(train_qa, "QUESTIONS_PER_BATCH", 3)
    batched = build_windows(cfg)
    assert whole.keys() == batched.keys()
    for key, value in whole.items():
        assert value.dtype == batched[key].dtype and np.array_equal(value, batched[key]), key
