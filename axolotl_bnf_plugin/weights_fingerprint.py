"""A fingerprint of the weights a model was loaded from, for caches of what that model computed.

A cache of log-probs keyed on the model's path would be reused after the checkpoint at that path was
overwritten (the usual case: an SFT run writes `./out`, the preference run reads it), so the key is made
from the weight files themselves. Hashing every byte of a multi-GB checkpoint would cost seconds per GB, so
each file contributes its size, its modification time, its safetensors header (names, shapes, dtypes and
offsets of every tensor) and three 1 MiB windows of its content. A rewrite at the same path changes the
modification time; a different checkpoint copied with its times preserved still differs in its content
windows. An adapter is small and is hashed in full, from memory; the parameter names, shapes and dtypes in
memory are added, so embeddings resized at load time (added tokens) change the key too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WINDOW = 1 << 20


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, 64 << 20)))
        for offset in (0, max(stat.st_size // 2 - WINDOW // 2, 0), max(stat.st_size - WINDOW, 0)):
            f.seek(offset)
            digest.update(f.read(WINDOW))
    return digest.hexdigest()


def weight_files(source: str) -> list[Path]:
    """The weight files of a local model directory, or of a hub model's cached snapshot (none if unknown)."""
    directory = Path(source) if source else None
    if directory is None or not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not a hub id in the local cache: no files to fingerprint
            return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _in_memory_sample(model: torch.nn.Module) -> str:
    """When no weight files are known: up to 4096 evenly spaced values of every parameter."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(flat.numel() // 4096, 1)
            digest.update(name.encode())
            digest.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(base_model: torch.nn.Module) -> str:
    """Fingerprint of a `PreTrainedModel`'s weights (see the module docstring); adapters excluded."""
    digest = hashlib.sha256()
    files = weight_files(str(getattr(base_model.config, "_name_or_path", "")))
    for path in files:
        digest.update(file_fingerprint(path).encode())
    if not files:
        digest.update(_in_memory_sample(base_model).encode())
    for name, param in base_model.named_parameters():
        # A ZeRO-3 partition's full shape, and the dtype of what is stored (ZeRO-3 keeps its partitions in the
        # run's precision whatever `param.dtype` says; elsewhere an fp32-upcast module computes in fp32).
        shape = tuple(getattr(param, "ds_shape", param.shape))
        dtype = getattr(param, "ds_tensor", param).dtype
        digest.update(f"{name}|{shape}|{dtype}".encode())
    return digest.hexdigest()


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """Full hash of a (small) set of tensors, e.g. an adapter's weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach()
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}".encode())
        value = value.cpu().contiguous().reshape(-1)
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
