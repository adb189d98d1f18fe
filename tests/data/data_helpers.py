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
