"""Typed settings, validated once where they enter the program."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Tokens (padding included) per inference call: small batches keep activations in cache (pipeline.answer.Answerer).
BATCH_TOKENS = 512


class ColumnError(ValueError):
    """A table lacks a column the job reads, or has one the job would add; the message names it."""


@dataclass(frozen=True)
class WindowSettings:
    """How a (question, context) pair is cut into model inputs.

    ``doc_stride`` follows BERT's run_squad: it is the *step* between the first context tokens of
    consecutive windows (not the overlap, which Hugging Face calls "stride"). A window holds
    ``[CLS] question [SEP] context-part [SEP]``; the question is cut to ``max_query_len`` tokens.
    """

    max_seq_len: int = 384
    doc_stride: int = 128
    max_query_len: int = 64

    def __post_init__(self) -> None:
        if self.max_query_len < 1:
            raise ValueError(f"max_query_len must be >= 1, got {self.max_query_len}")
        room = self.max_seq_len - self.max_query_len - 3
        if room < 1:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} leaves no room for context after a question of "
                f"max_query_len {self.max_query_len} tokens and 3 special tokens"
            )
        if self.doc_stride < 1:
            raise ValueError(f"doc_stride must be >= 1, got {self.doc_stride}")


@dataclass(frozen=True)
class DecodeSettings:
    """How answer spans are chosen from start/end logits, and which rows get none."""

    max_answer_len: int = field(default=30, metadata={"help": "longest answer, in tokens"})
    top_k: int = field(default=1, metadata={"help": "answers kept per question (a top_answers column if > 1)"})
    max_context_chars: int | None = field(default=None, metadata={
        "help": "a row whose context has more characters gets an error and no answer (default: no limit; a huge "
                "context is answered, slowly, by one actor: docs/concepts/windows-and-long-contexts.md)"})

    def __post_init__(self) -> None:
        if self.max_answer_len < 1:
            raise ValueError(f"max_answer_len must be >= 1, got {self.max_answer_len}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_context_chars is not None and self.max_context_chars < 1:
            raise ValueError(f"--max-context-chars must be >= 1, got {self.max_context_chars}")


@dataclass(frozen=True)
class Columns:
    """Names of the input columns the job reads; every other column passes through."""

    id: str = field(default="id", metadata={"help": "input column with the row id (absent: derived as <file>:<row>)"})
    question: str = field(default="question", metadata={"help": "input column with the question"})
    context: str = field(default="context", metadata={"help": "input column with the context"})


@dataclass(frozen=True)
class WindowOverrides:
    """Window settings that win over the model directory's (None: as the model says)."""

    max_seq_len: int | None = field(default=None, metadata={"help": "override the model's window length"})
    doc_stride: int | None = field(default=None, metadata={
        "help": "override the step between windows (run_squad's doc_stride)"})
    max_query_len: int | None = field(default=None, metadata={"help": "override the question cut-off, in tokens"})

    def as_dict(self) -> dict[str, int]:
        """The overrides set, as load_spec takes them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


# Columns the job adds to every output row.
OUTPUT_COLUMNS = ("answer", "answer_start", "answer_end", "score", "probability", "error")
TOP_ANSWERS_COLUMN = "top_answers"
