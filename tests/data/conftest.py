import os
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "loader_worker.py")


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A synth dataset of 256 train pairs (a multiple of 2 ranks x batch 8) and its vocabulary."""
    root = tmp_path_factory.mktemp("synth_small")
    out, tok = root / "synth", root / "tok"
    from data_tools.cli import main
    assert main(["synth", "--out", str(out), "--seed", "3", "--num-train", "256", "--num-val", "8",
                 "--num-test", "8", "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    from albef_ds.tokenizer import build_vocab
    build_vocab([str(out / "captions.txt")], str(tok), vocab_size=300)
    return out, tok
