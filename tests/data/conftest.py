import pytest


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
