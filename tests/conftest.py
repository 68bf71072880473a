import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import write_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A dynamic-axes tiny BERT QA model directory with tokenizer.json."""
    return write_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory) -> Path:
    """The same weights with 64-token windows, so a paragraph spans many windows."""
    return write_model_dir(tmp_path_factory.mktemp("tiny64") / "model",
                           spec={"max_seq_len": 64, "doc_stride": 16, "max_query_len": 12})
