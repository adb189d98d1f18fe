"""Shared by the loader tests (a uniquely named module: conftest names clash across folders)."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "loader_worker.py")


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def make_cfg(dirs, batch=8, res=32, workers=0, **data):
    """A small loader config over ``dirs``; ``data`` sets further data.* keys."""
    from albef_ds.config import Config
    cfg = Config()
    cfg.model.image_res = res
    cfg.data.train_dirs = [str(d) for d in dirs]
    cfg.data.num_workers = workers
    cfg.data.max_tokens = 16
    cfg.data.pin_memory = False
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.train.micro_batch_size = batch
    return cfg
