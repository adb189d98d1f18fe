"""The albef-data command line: every subcommand answers --help; bench runs end to end."""
import json

import pytest

from data_tools.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: albef-data " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "convert" in capsys.readouterr().out


def test_bench_runs_and_writes_json(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "s"), "--num-train", "128", "--num-val", "2", "--num-test", "2",
                 "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    assert main(["build-vocab", str(tmp_path / "s" / "captions.txt"), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "200"]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "s" / "train"), "--image-res", "32", "--workers", "0",
                 "--batches", "2", "--batch-size", "8", "--repeats", "1", "--tokenizer", str(tmp_path / "tok"),
                 "--modes", "randaugment", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"]
    assert len(r) == 1 and r[0]["pairs"] == 16 and r[0]["pairs_per_s"] > 0 and r[0]["pairs_per_cpu_s"] > 0


def test_grounding_boxes_joins_refs_boxes_and_proposals(tmp_path):
    """The reference's RefCOCO+ eval JSON + REFER refs + COCO boxes + dets -> entries with
    box, proposals and split; an entry whose ref is unknown is skipped and named."""
    import json
    import pickle

    from data_tools.cli import main
    (tmp_path / "val.json").write_text(json.dumps([
        {"image": "coco/a.jpg", "text": "man on the left", "ref_id": 7},
        {"image": "coco/b.jpg", "text": "dog", "ref_id": 8},
        {"image": "coco/c.jpg", "text": "unknown", "ref_id": 99}]))
    with open(tmp_path / "refs.p", "wb") as f:
        pickle.dump([{"ref_id": 7, "ann_id": 70, "image_id": 1, "split": "testA"},
                     {"ref_id": 8, "ann_id": 80, "image_id": 2, "split": "val"}], f)
    (tmp_path / "instances.json").write_text(json.dumps(
        {"annotations": [{"id": 70, "bbox": [1, 2, 3, 4]}, {"id": 80, "bbox": [5, 6, 7, 8]}]}))
    (tmp_path / "dets.json").write_text(json.dumps({"1": [[0, 0, 10, 10, 0.9], [1, 2, 3, 4, 0.8]], "2": [[5, 6, 7, 8, 0.7]]}))
    out = tmp_path / "val_boxes.json"
    assert main(["grounding-boxes", str(tmp_path / "val.json"), "--refs", str(tmp_path / "refs.p"),
                 "--instances", str(tmp_path / "instances.json"), "--dets", str(tmp_path / "dets.json"),
                 "--out", str(out)]) == 0
    entries = json.loads(out.read_text())
    assert entries == [
        {"image": "coco/a.jpg", "text": "man on the left", "ref_id": 7, "box": [1.0, 2.0, 3.0, 4.0], "split": "testA",
         "proposals": [[0.0, 0.0, 10.0, 10.0], [1.0, 2.0, 3.0, 4.0]]},
        {"image": "coco/b.jpg", "text": "dog", "ref_id": 8, "box": [5.0, 6.0, 7.0, 8.0], "split": "val",
         "proposals": [[5.0, 6.0, 7.0, 8.0]]}]


def test_build_vocab_names_the_lines_that_are_not_utf8_and_leaves_them_out(tmp_path, capsys):
    """As convert rejects such a caption (bad_caption), build-vocab leaves the line out and
    says so; 'caf\\xe9' (latin-1) would otherwise train the replacement character."""
    captions = tmp_path / "captions.txt"
    captions.write_bytes(b"a red square\ncaf\xe9 au lait\nblue circle\nanother caf\xe9\n")
    assert main(["build-vocab", str(captions), "--out", str(tmp_path / "tok"), "--vocab-size", "100"]) == 0
    err = capsys.readouterr().err
    assert f"build-vocab: {captions}: 2 line(s) not valid UTF-8 left out (the first: line 2)" in err, err
    vocab = (tmp_path / "tok" / "vocab.txt").read_text(encoding="utf-8").split()
    assert "\ufffd" not in vocab and "caf" not in vocab and "lait" not in vocab, vocab
    assert "square" in vocab or "squ" in "".join(vocab)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_says_what_it_does_and_only_meaningful_defaults_are_shown(command, capsys):
    from data_tools.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    silent = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert not silent, silent
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for noise in ("(default: None)", "(default: True)", "(default: False)", "``"):
        assert noise not in text, (noise, text)
    from data_tools.cli import HelpFormatter
    formatter = HelpFormatter("albef-data")
    doubled = [a.option_strings for a in sub._actions if a.help and formatter._expand_help(a).count("default") > 1]
    assert not doubled, doubled  # never a default stated twice


def test_the_top_help_reads_as_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out
