"""Reparam: data_prep, train and launcher for DeepSpeed ZeRO training. Dependencies are pinned here only."""

from setuptools import find_packages, setup

setup(
    name="reparam",
    version="0.1.0",
    description="Fine-tune or retrain language models across many machines on DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["data_prep", "data_prep.*", "train", "train.*", "launcher", "launcher.*"]),
    install_requires=[
        # Install torch==2.13.0 first (CPU wheel or your CUDA build): a bare `torch` requirement in a fresh venv
        # pulls a multi-GB CUDA build. A CUDA build `2.13.0+cuXXX` satisfies this pin.
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "datasets==5.2.0",
        "tokenizers==0.23.3",
        # SentencePiece tokenizer dirs (tokenizer.model, no tokenizer.json): transformers converts them with these
        "sentencepiece==0.2.3",
        "protobuf==7.36.2",
        "gigatoken==0.10.0",
        "awkward==2.14.0",  # data_prep reads gigatoken's awkward output zero-copy
        "orjson==3.13.0",  # jsonl parsing, about twice as fast as json.loads
        "zstandard==0.25.0",  # .jsonl.zst inputs
        "Jinja2==3.1.6",  # chat templates for sft records
        "tensorboard==2.21.0",
        "safetensors==0.8.0",
        "xxhash==4.1.0",  # checkpoint and export checksums (train.checkpoint); datasets needs it too
        "peft==0.21.2",
        "numpy==2.4.6",
        "pyarrow==26.0.1",
        "PyYAML==6.0.4",
        "tqdm==4.70.1",
        "psutil==7.2.2",
        "matplotlib==3.11.2",  # python -m train.report
    ],
    extras_require={"dev": ["pytest==9.2.0", "hypothesis==6.170.15"]},  # hypothesis: tests/unit/test_fuzz_inputs.py
)
