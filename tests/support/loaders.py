"""Small loader configs for the data tests (tests/data; one rank per process:
tests/support/drivers/loader_worker.py)."""


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
