"""data_prep: corpus -> token shards + manifest, for `train/`, with any model family's Hugging Face tokenizer (or a
byte-level BPE tokenizer trained here on the corpus), records framed as that family frames them (`data_prep.encode`).

CPU-only by design: nothing here imports torch, deepspeed or transformers at module level, so it runs on prep
nodes without them. The shard format that training reads is defined in `data_prep.shards`.
"""

from data_prep.errors import DataError

__all__ = ["DataError"]
