"""data_prep: corpus -> byte-level BPE tokenizer -> token shards + manifest, for `train/`.

CPU-only by design: nothing here imports torch, deepspeed or transformers at module level, so it runs on prep
nodes without them. The shard format that training reads is defined in `data_prep.shards`.
"""

from data_prep.errors import DataError

__all__ = ["DataError"]
