"""Model checkpoints in the HF `save_pretrained` format (safetensors), written atomically.

A model directory holds
    query_encoder/ doc_encoder/ reader/   BertModel.save_pretrained (config.json + model.safetensors)
    heads.safetensors                     projections, MLM head transform + bias, copy head, null score
    realm.json                            kind, step, retrieval_dim, pooling, reader_head, copy_layer/init, components
    manifest.json                         sha256 of every file (checked on load)
Also the doc tower alone (`published/step_N/`, for the embedding workers) and training states
(`checkpoints/step_N/`, for resume: the engine's files, loaded with weights_only=True).
Model weights never unpickle: safetensors only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import BertModel

from core.errors import InputError
from core.files import atomic_dir, fsync_tree, verify_manifest, write_manifest
from trainer.bert import load_bert
from trainer.model import REALM, KnowledgeAugmentedEncoder, OpenQAModel, Retriever, Tower

COMPONENTS = ("query_encoder", "doc_encoder", "reader")
KINDS = ("realm_model", "openqa_model")


def _berts(model: REALM | OpenQAModel) -> dict[str, BertModel]:
    r = model.retriever
    reader = model.reader.bert if isinstance(model, REALM) else model.reader
    return {"query_encoder": r.query_tower.encoder, "doc_encoder": r.doc_tower.encoder, "reader": reader}


def _head_params(model: REALM | OpenQAModel) -> dict[str, torch.nn.Parameter]:
    """Every parameter outside the three BERTs, by its name in heads.safetensors."""
    r = model.retriever
    params = {"query_proj.weight": r.query_tower.proj.weight, "query_proj.bias": r.query_tower.proj.bias,
              "doc_proj.weight": r.doc_tower.proj.weight, "doc_proj.bias": r.doc_tower.proj.bias}
    if isinstance(model, REALM):
        h = model.reader.mlm_head
        params.update({"mlm.dense.weight": h.dense.weight, "mlm.dense.bias": h.dense.bias,
                       "mlm.norm.weight": h.norm.weight, "mlm.norm.bias": h.norm.bias, "mlm.bias": h.bias,
                       "null_score": model.null_score})
        if model.reader.copy_head is not None:
            params.update({f"copy.{n}": p for n, p in model.reader.copy_head.named_parameters()})
    else:
        params.update({f"span.{n}": p for n, p in model.span_head.named_parameters()})
    return params


def save_model(model: REALM | OpenQAModel, directory: str | os.PathLike, step: int, extra: dict | None = None
               ) -> Path:
    """Write the whole model to `directory` atomically; returns the directory."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        for name, module in _berts(model).items():
            module.save_pretrained(tmp / name, safe_serialization=True)
        heads = {k: v.detach().float().cpu().contiguous() for k, v in _head_params(model).items()}
        save_file(heads, str(tmp / "heads.safetensors"))
        tower = model.retriever.query_tower
        meta = {"kind": "realm_model" if isinstance(model, REALM) else "openqa_model", "step": step,
                "retrieval_dim": tower.proj.out_features, "pooling": tower.pooling,
                "vocab_size": tower.encoder.config.vocab_size, **(extra or {})}
        if isinstance(model, REALM):
            meta["reader_head"] = model.reader.head
            if model.reader.copy_layer:  # absent = the last layer, as every earlier checkpoint
                meta["copy_layer"] = model.reader.copy_layer
            if model.reader.copy_init != "random":  # how the head started: pre-training keeps ICT's head if the same
                meta["copy_init"] = model.reader.copy_init
            if not model.null_document:  # absent = the paper's marginal, as every earlier checkpoint
                meta["null_document"] = False
        (tmp / "realm.json").write_text(json.dumps(meta, indent=2))
        write_manifest(tmp, meta)
    return directory


def _read_meta(d: Path) -> dict:
    if not d.is_dir():
        raise InputError(f"{d}: checkpoint not found")
    meta = verify_manifest(d)
    if meta.get("kind") not in KINDS:
        raise InputError(f"{d}: not a REALM model checkpoint (kind={meta.get('kind')!r})")
    return meta


def load_model(directory: str | os.PathLike) -> tuple[REALM | OpenQAModel, dict]:
    """Load a model directory written by `save_model`; refuse damaged or foreign ones."""
    d = Path(directory)
    meta = _read_meta(d)
    q, doc, reader = (load_bert(d / c) for c in COMPONENTS)
    retriever = Retriever(q, doc, meta["retrieval_dim"], meta["pooling"])
    if meta["kind"] == "realm_model":
        reader = KnowledgeAugmentedEncoder(reader, meta.get("reader_head", "mlm"), meta.get("copy_layer", 0),
                                           meta.get("copy_init", "random"))
        model = REALM(retriever, reader, meta.get("null_document", True))
    else:
        model = OpenQAModel(retriever, reader)
    load_heads(model, d / "heads.safetensors")
    return model, meta


def load_heads(model: REALM | OpenQAModel, path: Path) -> None:
    try:
        heads = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: corrupt: {e}") from None
    params = _head_params(model)
    for k, v in params.items():
        if k not in heads or heads[k].shape != v.shape:
            got = tuple(heads[k].shape) if k in heads else "missing"
            raise InputError(f"{path}: tensor '{k}' is {got}, model expects {tuple(v.shape)} "
                             "(checkpoint of another model size?)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(heads[name])


def step_dirs(parent: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished `step_N` directories under parent, oldest first (temp dirs never match)."""
    p = Path(parent)
    if not p.is_dir():
        return []
    found = []
    for child in p.iterdir():
        m = re.fullmatch(r"step_(\d+)", child.name)
        if m and (child / "manifest.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


# ---- the doc encoder, published for the embedding workers --------------------------------------


def save_doc_tower(tower: Tower, directory: str | os.PathLike, step: int, extra: dict | None = None) -> Path:
    """`published/step_N/`: the doc tower alone (BERT + projection), what a refresh needs."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        tower.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
        save_file({"weight": tower.proj.weight.detach().float().cpu().contiguous(),
                   "bias": tower.proj.bias.detach().float().cpu().contiguous()}, str(tmp / "proj.safetensors"))
        meta = {"kind": "doc_encoder", "step": step, "pooling": tower.pooling,
                "retrieval_dim": tower.proj.out_features, **(extra or {})}
        (tmp / "realm.json").write_text(json.dumps(meta, indent=2))
        write_manifest(tmp, meta)
    return directory


def load_doc_tower(directory: str | os.PathLike) -> tuple[Tower, dict]:
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d}: published doc encoder not found")
    meta = verify_manifest(d)
    if meta.get("kind") != "doc_encoder":
        raise InputError(f"{d}: not a published doc encoder (kind={meta.get('kind')!r})")
    tower = Tower(load_bert(d / "encoder"), meta["retrieval_dim"], meta["pooling"])
    try:
        proj = load_file(str(d / "proj.safetensors"))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{d / 'proj.safetensors'}: corrupt: {e}") from None
    with torch.no_grad():
        tower.proj.weight.copy_(proj["weight"])
        tower.proj.bias.copy_(proj["bias"])
    return tower.eval(), meta


# ---- training state (engine + optimizer + RNG + data position), for resume ---------------------


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_training_state(engine, parent: str | os.PathLike, step: int, client_state: dict, rank: int = 0,
                        keep: int = 2) -> Path:
    """`checkpoints/step_N/` written by every rank into `.tmp-step_N`, renamed by rank 0 once
    all ranks are done and the manifest (sha256 of every file) is written. Keeps the newest `keep`."""
    parent = Path(parent)
    tmp, final = parent / f".tmp-step_{step}", parent / f"step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(tmp, client_state)
    _barrier()
    if rank == 0:
        write_manifest(tmp, {"kind": "training_state", "step": step})
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in step_dirs(parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_training_state(parent: str | os.PathLike) -> Path | None:
    """The newest complete `step_N` (manifest present and every file intact), else None."""
    for _, path in reversed(step_dirs(parent)):
        meta = verify_manifest(path)
        if meta.get("kind") == "training_state":
            return path
    return None
