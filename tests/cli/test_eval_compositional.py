"""``albef-ds eval-retrieval`` runs the compositional test it finds beside the split (or is
named), prints ITC and ITM accuracy beside chance and writes them with --out; a missing
file is one line and exit 2."""
import json

from data_tools.cli import main as albef_data

from tests.support.launch import in_process


def test_eval_retrieval_reports_the_compositional_test(tmp_path):
    data, tok = tmp_path / "data", tmp_path / "tok"
    assert albef_data(["synth", "--out", str(data), "--num-train", "60", "--num-val", "4", "--num-test", "6",
                       "--num-compositional", "10", "--workers", "1", "--no-progress"]) == 0
    assert albef_data(["build-vocab", str(data / "captions.txt"), "--out", str(tok), "--vocab-size", "200"]) == 0
    base = ["eval-retrieval", "--untrained", "--config", "tiny", "--set", f"data.tokenizer={tok}",
            "--split", str(data / "test.json")]
    code, output = in_process([*base, "--max-images", "8", "--out", str(tmp_path / "out")])
    assert code == 0, output[-3000:]
    assert "compositional test: 8 images, true caption among 4 candidates" in output, output
    m = json.loads((tmp_path / "out" / "compositional.json").read_text())
    assert m["n"] == 8 and m["chance"] == 25.0
    for key in ("itc_acc", "itm_acc", "itc_vs_colour_swap", "itm_vs_relation_swap"):
        assert 0.0 <= m[key] <= 100.0, key
    # retrieval.json names each figure by its ranking: ITC alone, ITM re-ranked, ITM + ITC
    retrieval = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    for key in ("itc_txt_r1", "itm_txt_r1", "itm_itc_txt_r1", "itc_r_mean", "itm_r_mean", "itm_itc_r_mean"):
        assert 0.0 <= retrieval[key] <= 100.0, key
    assert not {"txt_r1", "img_r1", "r_mean"} & set(retrieval), sorted(retrieval)

    missing = tmp_path / "nope.json"
    code, output = in_process([*base, "--compositional", str(missing)])
    lines = [x for x in output.splitlines() if x.startswith("albef-ds ")]
    assert code == 2 and len(lines) == 1 and str(missing) in lines[0], output[-3000:]
