"""Writes sample.parquet: a few hand-written questions for README's first run (and tests).

    python tests/data/make_sample.py
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LAKE = (
    "Lake Baikal, in southern Siberia, is the deepest lake in the world. Its deepest point lies "
    "1,642 metres below the surface, and the lake holds about 23,600 cubic kilometres of fresh water, "
    "roughly a fifth of all the unfrozen fresh water on Earth. The lake formed in an ancient rift "
    "valley some 25 million years ago, which also makes it the oldest lake known. More than 300 rivers "
    "flow into Baikal, but only one, the Angara, flows out of it."
)
BRIDGE = (
    "The Øresund Bridge joins Copenhagen in Denmark with Malmö in Sweden. Opened on 1 July 2000, it "
    "carries a motorway above a railway line for almost eight kilometres, then dives into a tunnel "
    "under the sea near the Danish coast so that ships and aircraft approaching Copenhagen Airport "
    "are not obstructed. The crossing was designed by the engineering firm Arup."
)
COFFEE = (
    "Espresso is brewed by forcing nearly boiling water through finely ground coffee at a pressure of "
    "about nine bars. A single shot takes 25 to 30 seconds to pull. The crema, a reddish-brown foam on "
    "top, forms when carbon dioxide from the freshly roasted beans is emulsified with the coffee oils. "
    "A caffè latte adds steamed milk to a shot of espresso."
)
ROWS = [
    ("q01", "What is the deepest lake in the world?", LAKE, "geography"),
    ("q02", "How deep is Lake Baikal?", LAKE, "geography"),
    ("q03", "Which river flows out of Lake Baikal?", LAKE, "geography"),
    ("q04", "How long ago did the lake form?", LAKE, "geography"),
    ("q05", "Which cities does the Øresund Bridge connect?", BRIDGE, "engineering"),
    ("q06", "When did the Øresund Bridge open?", BRIDGE, "engineering"),
    ("q07", "Who designed the crossing?", BRIDGE, "engineering"),
    ("q08", "At what pressure is espresso brewed?", COFFEE, "food"),
    ("q09", "How long does a shot of espresso take?", COFFEE, "food"),
    ("q10", "What does a caffè latte add to espresso?", COFFEE, "food"),
    ("q11", None, COFFEE, "bad row: no question"),
    ("q12", "What is this about?", "   ", "bad row: blank context"),
]


def sample_table() -> pa.Table:
    ids, questions, contexts, topics = zip(*ROWS)
    return pa.table({"id": list(ids), "question": list(questions), "context": list(contexts),
                     "topic": list(topics)})


if __name__ == "__main__":
    out = Path(__file__).with_name("sample.parquet")
    pq.write_table(sample_table(), out)
    print(f"wrote {out}")
