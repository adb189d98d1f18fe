"""The training loader: streams of MDS shards -> ``StreamingDataLoader`` of fixed-shape batches,
and the loader state used for mid-epoch resumption."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
from typing import Any, Optional

from streaming import StreamingDataLoader

from albef_ds.data import shm
from albef_ds.distributed import barrier
from albef_ds.data.collate import Collate
from albef_ds.config import DECODE_ON
from albef_ds.data.transforms import make_train_transform

log = logging.getLogger(__name__)



def _is_remote(path: str) -> bool:
    return "://" in path


def _check_dirs(dirs: list) -> None:
    if not dirs:
        raise ValueError("config key 'data.train_dirs' is empty: give one or more MDS dataset folders")
    for d in dirs:
        if _is_remote(d):
            continue
        if not os.path.isdir(d):
            raise FileNotFoundError(f"train dir not found: {d} (data.train_dirs)")
        if not os.path.exists(os.path.join(d, "index.json")):
            raise FileNotFoundError(f"train dir {d} has no index.json: not an MDS dataset "
                                    f"(convert it with `albef-data convert`, or merge its parts "
                                    f"with `albef-data merge {d}`)")
        _check_shards(d)


def _check_shards(root: str) -> None:
    """Every shard index.json names is there at the size it states (a stat per shard, no
    read): a truncated or missing shard is named at start-up, not after a run of
    unreadable samples somewhere in an epoch."""
    index_path = os.path.join(root, "index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            shards = json.load(f)["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a readable MDS index ({e})") from e
    for i, shard in enumerate(shards):
        present = None
        for kind in ("raw_data", "zip_data"):
            info = shard.get(kind)
            if not info:
                continue
            path = os.path.join(root, info["basename"])
            if os.path.exists(path):
                present = (path, info.get("bytes"))
                break
        if present is None:
            names = [shard[k]["basename"] for k in ("raw_data", "zip_data") if shard.get(k)]
            raise FileNotFoundError(f"{index_path}: shard {i} ({' or '.join(names)}) is missing")
        path, expected = present
        actual = os.path.getsize(path)
        if expected is not None and actual != expected:
            raise ValueError(f"shard {path} has {actual} bytes but {index_path} says {expected}: "
                             f"truncated, or still being written (re-run the conversion)")


def _export_world(rank: int, world_size: int, local_world_size: Optional[int] = None) -> None:
    """Make streaming's view of the world (env vars, or torch.distributed) match ours.

    Streaming reads LOCAL_WORLD_SIZE to know how many ranks share a node (SYSTEMS_FACTS:
    srun and the deepspeed launcher do not set it). The trainer passes the launch
    environment's count (albef_ds.distributed reads every launcher's variables); without
    it, when torch.distributed is up, the ranks on this host are counted; otherwise every
    rank is taken to be on this node.
    """
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        env = os.environ.get(name)
        if env is not None and int(env) != value:
            raise ValueError(f"{name}={env} in the environment but build_train_loader got {value}")
    if world_size == 1 and "WORLD_SIZE" not in os.environ:
        return  # streaming's defaults (rank 0 of 1, alone on the node) are right; leave env alone
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    if local_world_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    elif "LOCAL_WORLD_SIZE" not in os.environ:
        local = world_size
        import torch.distributed as dist
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            hosts = [None] * world_size
            dist.all_gather_object(hosts, socket.gethostname())
            local = hosts.count(socket.gethostname())
        os.environ["LOCAL_WORLD_SIZE"] = str(local)
        log.info("LOCAL_WORLD_SIZE not set; using %d", local)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(rank % int(os.environ["LOCAL_WORLD_SIZE"]))


def build_streams(cfg) -> list:
    from streaming import Stream

    d = cfg.data
    weights = d.train_weights
    if weights is not None:
        if len(weights) != len(d.train_dirs):
            raise ValueError(f"data.train_weights has {len(weights)} entries for {len(d.train_dirs)} train_dirs")
        if any(w <= 0 for w in weights):
            raise ValueError(f"data.train_weights must be positive, got {weights}")
        total = float(sum(weights))
    streams = []
    caching = False
    for i, path in enumerate(d.train_dirs):
        kw: dict[str, Any] = {}
        if weights is not None:
            kw["proportion"] = weights[i] / total
        if _is_remote(path) or d.cache_dir:
            # remote (s3://, gs://, ...) or, with data.cache_dir, a shared filesystem path:
            # streaming copies the shards it needs into the local cache
            cache = d.cache_dir or os.path.join(tempfile.gettempdir(), "albef_ds_cache")
            kw.update(remote=path, local=os.path.join(cache, hashlib.sha1(path.encode()).hexdigest()[:16]))
            caching = True
        else:
            kw["local"] = path
        streams.append(Stream(**kw))
    return streams, caching


def build_train_loader(cfg, tokenizer, rank: int, world_size: int, epoch_seed: Optional[int] = None,
                       local_world_size: Optional[int] = None, run_dir: Optional[str] = None,
                       local_rank: Optional[int] = None, device=None):
    """A ``streaming.StreamingDataLoader`` over ``cfg.data.train_dirs``.

    Batches are dicts: ``image`` float32 [B, 3, R, R] (CLIP-normalised, R = model.image_res;
    with ``data.decode_on: device`` decoded and augmented on ``device``, default the training
    device, by the returned ``DeviceDecodeLoader`` as it yields),
    ``text_ids`` / ``text_mask`` int64 [B, data.max_tokens], ``image_id`` int64 [B] (content
    hash: duplicates share it), ``key`` list of B str, ``skipped`` int64 [B] (1 where an
    unreadable record was replaced by the next one). B = train.micro_batch_size; partial
    batches are dropped.

    ``epoch_seed`` is the base seed of the per-sample augmentation RNG (default:
    ``cfg.train.seed``); the epoch and sample index complete it. Shuffling uses
    ``data.shuffle_seed`` and ``data.num_canonical_nodes``.

    ``run_dir``: the node's local leader (``local_rank`` 0) first reclaims the shared memory
    a hard-killed earlier job of this run left on this host, then records this job's
    (albef_ds/data/shm.py); without it nothing is cleaned.
    """
    from albef_ds.data.dataset import PairDataset

    d = cfg.data
    if d.decode_on not in DECODE_ON:
        raise ValueError(f"config key 'data.decode_on': must be one of {', '.join(DECODE_ON)}, "
                         f"got {d.decode_on!r}")
    _check_dirs(list(d.train_dirs))
    _export_world(rank, world_size, local_world_size)
    leader = run_dir is not None and (local_rank if local_rank is not None else rank) == 0
    if leader:
        shm.reclaim(run_dir)
    barrier()  # every local rank looks for a free streaming prefix after the reclaim
    streams, caching = build_streams(cfg)
    dataset = PairDataset(
        streams=streams,
        # A node-local copy of the shards is bounded: least recently used shards are evicted.
        cache_limit=d.cache_limit if caching else None,
        transform=make_train_transform(cfg),
        max_words=d.max_words,
        aug_seed=cfg.train.seed if epoch_seed is None else int(epoch_seed),
        flip_swaps_left_right=d.flip_swaps_left_right,
        shuffle=d.shuffle,
        shuffle_seed=d.shuffle_seed,
        num_canonical_nodes=d.num_canonical_nodes,
        partition_algo="relaxed",
        batch_size=cfg.train.micro_batch_size,
        decode_on=d.decode_on,
    )
    if leader:
        prefix = dataset._shm_prefix_int
        shm.write_record(run_dir, prefix, shm._locals_of(prefix, shm.SHM_DIR) or [], dataset._filelock_root)
    kwargs: dict[str, Any] = {}
    if d.num_workers > 0:
        kwargs["prefetch_factor"] = d.prefetch_factor
    import torch
    if d.decode_on == "device":
        from albef_ds.data.device_transforms import DeviceTrainTransform
        cls = DeviceDecodeLoader
        kwargs.update(transform=DeviceTrainTransform(cfg.model.image_res, d.randaugment_m), device=device)
    else:
        cls = StreamingDataLoader
    return cls(dataset, batch_size=cfg.train.micro_batch_size,
               collate_fn=Collate(tokenizer, d.max_tokens, d.text_form), num_workers=d.num_workers,
               pin_memory=d.pin_memory and torch.cuda.is_available(), drop_last=True, **kwargs)


class DeviceDecodeLoader(StreamingDataLoader):
    """data.decode_on: device. Workers yield raw bytes and augmentation plans; this loader
    finishes each batch on ``device`` (device_transforms.finish_batch) as it yields it, in the
    main process, so the trainer receives the CPU path's batch contract and needs no hook.
    Position and state are streaming's: counted on the collated batch, before finishing."""

    def __init__(self, *args, transform, device=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.transform, self.device = transform, device

    def __iter__(self):
        from albef_ds.data.device_transforms import finish_batch
        from albef_ds.distributed import device as training_device

        # resolved here, not at build time: the launcher picks the CUDA device before training
        device = self.device if self.device is not None else training_device()
        for batch in super().__iter__():
            yield finish_batch(batch, self.transform, device)


# ----------------------------------------------------------------------------- state

def loader_state_dict(loader) -> dict:
    """The loader's position (epoch, sample_in_epoch, shuffle settings...): JSON-able.

    Take it in the main process after the training step that consumed the last batch;
    every rank gets the same dict (streaming counts samples_yielded x world size)."""
    state = loader.state_dict()
    if state is None:
        raise TypeError("not a StreamingDataLoader over a StreamingDataset")
    return state


def load_loader_state(loader, state: dict) -> None:
    """Restore a position before iterating; the next epoch resumes where ``state`` left off.
    Streaming silently ignores a state from an older epoch than the dataset's counter, so
    call this on a freshly built loader."""
    loader.load_state_dict(state)


def save_loader_state(loader, path: str) -> dict:
    """Write ``loader_state_dict(loader)`` to ``path`` as JSON (atomically); returns it."""
    state = loader_state_dict(loader)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, path)
    return state


def read_loader_state(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
