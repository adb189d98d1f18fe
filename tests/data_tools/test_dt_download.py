"""``albef-data download``: a CC3M/CC12M-style URL list served from a local HTTP server on
127.0.0.1 (some URLs 404, one serves bytes that are no image) -> img2dataset -> counts by
reason -> ``albef-data convert`` -> shards whose captions and image bytes are the served ones.

The end-to-end tests need img2dataset (the ``download`` extra, part of ``dev``): without it they
skip, except under CI where they fail; the URL-list reading and the missing-extra message are
tested either way."""
import importlib.util
import json
import os

import pytest

import tests.support.formats as F
from data_tools import download as D
from data_tools.cli import EXIT_NOTHING_KEPT, main
from tests.support.web import serving

HAVE_IMG2DATASET = importlib.util.find_spec("img2dataset") is not None
#: under CI (.ci/run sets CI=true; the dev extra installs img2dataset) a missing one fails the tests
needs_img2dataset = pytest.mark.skipif(
    not HAVE_IMG2DATASET and not os.environ.get("CI"),
    reason='img2dataset is not installed (pip install "albef-ds[download]"; the dev extra has it): '
           'its pins (pandas<3) may not fit this environment')


@pytest.fixture
def server(tmp_path):
    """(tmp_path/www, the base URL it is served on)."""
    root = tmp_path / "www"
    root.mkdir()
    with serving(root) as base:
        yield root, base


def _serve_images(root, base, n=6):
    """n images (PNG and JPEG) on the server; returns [(url, caption, bytes)]."""
    served = []
    for i in range(n):
        ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
        data = F.jpeg(100 + i, fmt=fmt)
        (root / f"{i}.{ext}").write_bytes(data)
        served.append((f"{base}/{i}.{ext}", f"a served picture number {i}, é", data))
    return served


def _download(*args):
    return main(["download", *map(str, args), "--processes", "1", "--threads", "4", "--timeout", "5"])


@needs_img2dataset
@pytest.mark.slow
def test_cc3m_url_list_downloads_counts_404s_and_converts_byte_exact(server, tmp_path, capsys):
    root, base = server
    served = _serve_images(root, base)
    (root / "not_an_image.jpg").write_bytes(b"<html>an error page saved as .jpg</html>")
    missing = [f"{base}/gone_{i}.jpg" for i in range(3)]
    rows = [(u, c) for u, c, _ in served] + [(u, f"a lost picture {i}") for i, u in enumerate(missing)]
    rows.insert(2, (f"{base}/not_an_image.jpg", "not an image"))
    rows.insert(4, ("", "a row without a url"))
    lines = [f"{c}\t{u}" for u, c in rows]  # CC3M: caption<TAB>url, no header
    (tmp_path / "Train_GCC-training.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    out, shards = tmp_path / "cc3m_images", tmp_path / "shards"
    assert _download(tmp_path / "Train_GCC-training.tsv", "--out", out, "--convert-to", shards,
                     "--no-progress") == 0
    err = capsys.readouterr().err
    assert "no header row" in err and "url column 1, caption column 0" in err
    assert "dropped 1 (empty_url)" in err
    n_tried = len(served) + 1 + len(missing)
    assert f"tried {n_tried} URLs in 1 shard: {len(served) + 1} downloaded, {len(missing)} failed" in err
    assert f"HTTP 404: {len(missing)}" in err

    totals = D.read_stats(str(out))
    assert (totals["tried"], totals["downloaded"]) == (n_tried, len(served) + 1)
    assert totals["failed"] == {"HTTP 404": len(missing)}

    # the convert ran on img2dataset's tars: the error page is rejected, the rest kept as served
    got, keys = F.read_dataset(str(shards))
    by_caption = {cap: sha for sha, cap in got.values()}
    assert len(keys) == len(served) == len(set(keys))
    assert by_caption == {c: F.sha1(b) for _, c, b in served}
    assert f"kept {len(served)} of {len(served) + 1} rows" in err
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["skipped"]["corrupt_image"] == 1 and stats["kept"] == len(served)


@needs_img2dataset
@pytest.mark.slow
def test_cc12m_order_by_column_options_and_resume(server, tmp_path, capsys):
    root, base = server
    served = _serve_images(root, base, n=3)
    lines = [f"{u}\t{c}" for u, c, _ in served] + [f"{base}/missing.jpg\tgone"]  # CC12M: url<TAB>caption
    (tmp_path / "cc12m.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "cc12m_images"
    args = [tmp_path / "cc12m.tsv", "--out", out, "--no-header", "--url-col", "0", "--caption-col", "1"]
    assert _download(*args) == 0
    err = capsys.readouterr().err
    assert "tried 4 URLs in 1 shard: 3 downloaded, 1 failed" in err
    assert f"next: albef-data convert {out} --out {out}_shards" in err
    assert _download(*args) == 0  # resumed: the shard is done, the same totals
    assert "resuming" in capsys.readouterr().err
    assert main(["convert", str(out), "--out", str(tmp_path / "shards"), "--no-progress"]) == 0
    got, _ = F.read_dataset(str(tmp_path / "shards"))
    assert sorted(cap for _, cap in got.values()) == sorted(c for _, c, _ in served)
    # another list into the same folder is refused
    (tmp_path / "other.tsv").write_text(f"{base}/0.jpg\tx\n")
    assert _download(tmp_path / "other.tsv", "--out", out) == 2
    assert "use a new --out folder" in capsys.readouterr().err


@needs_img2dataset
@pytest.mark.slow
def test_nothing_downloaded_exits_non_zero_with_a_hint(server, tmp_path, capsys):
    _, base = server
    (tmp_path / "list.csv").write_text("url,caption\n" + "".join(f"{base}/no_{i}.jpg,c {i}\n" for i in range(4)))
    assert _download(tmp_path / "list.csv", "--out", tmp_path / "imgs") == EXIT_NOTHING_KEPT
    err = capsys.readouterr().err
    assert "a header row" in err and "downloaded 0 of 4 images" in err and "HTTP Error 404" in err
    assert "_stats.json" in err


def test_missing_img2dataset_names_the_extra(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_img2dataset(name, *a, **kw):
        if name == "img2dataset":
            raise ImportError("No module named 'img2dataset'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_img2dataset)
    (tmp_path / "list.tsv").write_text("c\thttp://127.0.0.1:9/x.jpg\n")
    assert main(["download", str(tmp_path / "list.tsv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "albef-ds[download]"' in err and "img2dataset is not installed" in err


def test_url_list_reading_columns_headers_and_bad_rows(tmp_path, capsys):
    # CC3M order, a row with a raw tab in its caption (3 fields), an empty caption
    (tmp_path / "a.tsv").write_text("one\thttp://h/1.jpg\ntwo\tbad\thttp://h/2.jpg\n\thttp://h/3.jpg\n"
                                    "four\thttp://h/4.jpg\n")
    s = D.write_url_list(str(tmp_path / "a.tsv"), D.DownloadOptions(out=str(tmp_path / "o1")))
    # every line counted: 4 = 2 to download + 1 malformed + 1 without a caption
    assert (s["lines"], s["header"], s["read"], s["kept"]) == (4, 0, 4, 2)
    assert s["dropped"] == {"malformed_row": 1, "empty_caption": 1}
    assert "3 fields, expected 2" in s["examples"]["malformed_row"][0]
    import pyarrow.parquet as pq
    t = pq.read_table(tmp_path / "o1" / D.URL_LIST_DIR / "urls.parquet").to_pylist()
    assert t == [{"url": "http://h/1.jpg", "caption": "one", "line": 1},
                 {"url": "http://h/4.jpg", "caption": "four", "line": 4}]
    refused = [json.loads(r) for r in (tmp_path / "o1" / D.URL_LIST_DIR / "list_rejects.jsonl").open()]
    assert [(r["line"], r["reason"]) for r in refused] == [(2, "malformed_row"), (3, "empty_caption")]
    assert refused[1]["url"] == "http://h/3.jpg" and refused[0]["text"] == "two\tbad\thttp://h/2.jpg"
    # a header, by name (quoted CSV); JSON lines; Parquet (LAION's URL/TEXT)
    (tmp_path / "b.csv").write_text('caption,url\n"a, quoted caption",http://h/1.jpg\n')
    s = D.write_url_list(str(tmp_path / "b.csv"), D.DownloadOptions(out=str(tmp_path / "o2")))
    assert s["kept"] == 1
    (tmp_path / "c.json").write_text('{"image_url": "http://h/1.jpg", "text": "x"}\n{"image_url": "", "text": "y"}\n')
    s = D.write_url_list(str(tmp_path / "c.json"), D.DownloadOptions(out=str(tmp_path / "o3")))
    assert (s["kept"], s["dropped"]) == (1, {"empty_url": 1})
    import pyarrow as pa
    pq.write_table(pa.table({"URL": ["http://h/1.jpg", None], "TEXT": ["laion style", "no url"]}),
                   tmp_path / "e.parquet")
    s = D.write_url_list(str(tmp_path / "e.parquet"), D.DownloadOptions(out=str(tmp_path / "o6")))
    assert (s["kept"], s["dropped"]) == (1, {"empty_url": 1})
    # header-less with three columns: the options are needed, and the message says so
    (tmp_path / "d.tsv").write_text("1\tcap\thttp://h/1.jpg\n")
    with pytest.raises(D.InputError, match="--url-col and --caption-col"):
        D.write_url_list(str(tmp_path / "d.tsv"), D.DownloadOptions(out=str(tmp_path / "o4")))
    s = D.write_url_list(str(tmp_path / "d.tsv"), D.DownloadOptions(out=str(tmp_path / "o4"), url_col="2",
                                                                     caption_col="1"))
    assert s["kept"] == 1
    with pytest.raises(D.InputError, match="is a name but the list has no header"):
        D.write_url_list(str(tmp_path / "d.tsv"), D.DownloadOptions(out=str(tmp_path / "o5"), url_col="url",
                                                                    caption_col="1"))


def test_failure_reasons():
    assert D.failure_reason("HTTP Error 404: Not Found") == "HTTP 404"
    assert D.failure_reason("<urlopen error timed out>") == "timeout"
    assert D.failure_reason("The read operation timed out") == "timeout"
    assert D.failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection error"
    assert D.failure_reason("Image decoding error") == "decode error"


@needs_img2dataset
@pytest.mark.slow
def test_a_line_that_is_not_utf8_is_dropped_and_named_the_rest_downloads(server, tmp_path, capsys):
    root, base = server
    served = _serve_images(root, base, n=3)
    lines = [f"{c}\t{u}".encode() for u, c, _ in served]
    lines.insert(1, b"a line without its url")  # malformed: the line numbers after it must not lag
    lines.insert(2, f"caf\xe9 au lait\t{base}/0.jpg".encode("latin-1"))  # one latin-1 byte on line 3
    (tmp_path / "list.tsv").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "images"
    assert _download(tmp_path / "list.tsv", "--out", out, "--no-progress") == 0
    err = capsys.readouterr().err
    assert f"URL list {tmp_path / 'list.tsv'}: 5 lines = 0 header + 3 URLs to download + 2 rejected" in err, err
    assert "dropped 1 (not_utf8): e.g. line 3: b'caf\\xe9 au lait'" in err, err
    assert "dropped 1 (malformed_row): e.g. line 2:" in err, err
    assert "tried 3 URLs in 1 shard: 3 downloaded, 0 failed" in err, err


@needs_img2dataset
@pytest.mark.slow
def test_every_line_of_a_mixed_list_is_a_pair_or_one_reject_through_download_convert_inspect(
        server, tmp_path, capsys):
    """A list with a header, a blank line, a malformed line, a non-UTF-8 line, an empty URL,
    a repeated URL, a 404 and an error page served as an image: download, convert and
    inspect account for all 11 lines, and one rejects file names each rejected line once
    with its URL, caption and a plain reason."""
    root, base = server
    served = _serve_images(root, base, n=3)
    (root / "not_an_image.jpg").write_bytes(b"<html>an error page saved as .jpg</html>")
    lines = [b"url\tcaption",                                                      # 1 header
             f"{served[0][0]}\t{served[0][1]}".encode(),                           # 2 pair
             b"a line without its url",                                            # 3 malformed_row
             f"{served[1][0]}\tcaf\xe9 au lait".encode("latin-1"),                 # 4 not_utf8
             b"\ta caption without its url",                                       # 5 empty_url
             f"{served[0][0]}\tthe first picture again".encode(),                  # 6 duplicate_url
             b"",                                                                  # 7 blank_line
             f"{base}/gone.jpg\ta lost picture".encode(),                          # 8 download_failed
             f"{base}/not_an_image.jpg\tan error page".encode(),                   # 9 corrupt_image
             f"{served[1][0]}\t{served[1][1]}".encode(),                           # 10 pair
             f"{served[2][0]}\t{served[2][1]}".encode()]                           # 11 pair
    (tmp_path / "list.tsv").write_bytes(b"\n".join(lines) + b"\n")
    images, shards = tmp_path / "images", tmp_path / "shards"

    assert _download(tmp_path / "list.tsv", "--out", images) == 0
    err = capsys.readouterr().err
    print(err)
    # before any download: 11 lines = 1 header + 5 URLs + 5 refused, each reason counted
    assert (f"URL list {tmp_path / 'list.tsv'}: 11 lines = 1 header + 5 URLs to download + 5 rejected "
            f"(malformed_row 1, not_utf8 1, empty_url 1, duplicate_url 1, blank_line 1)") in err, err
    assert "dropped 1 (duplicate_url): e.g. line 6: same URL as line 2" in err, err
    assert "tried 5 URLs in 1 shard: 4 downloaded, 1 failed" in err and "HTTP 404: 1" in err, err
    assert "11 lines = 1 header + 4 downloaded + 6 rejected (" in err and "download_failed 1)" in err, err
    assert f"each rejected line once in {images / 'rejects.jsonl'}" in err, err

    assert main(["convert", str(images), "--out", str(shards), "--no-progress"]) == 0
    said = capsys.readouterr()
    print(said.out, said.err)
    assert (f"URL list {tmp_path / 'list.tsv'}: 11 lines = 1 header + 3 pairs written + 7 rejected "
            f"(malformed_row 1, not_utf8 1, empty_url 1, duplicate_url 1, blank_line 1, download_failed 1, "
            f"corrupt_image 1)") in said.out, said.out
    assert f"each rejected line once in {shards / 'rejects.jsonl'}" in said.out

    rejected = [json.loads(line) for line in (shards / "rejects.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r for r in rejected}
    assert [r["line"] for r in rejected] == [3, 4, 5, 6, 7, 8, 9]  # once each, in line order
    assert {n: r["reason"] for n, r in by_line.items()} == {
        3: "malformed_row", 4: "not_utf8", 5: "empty_url", 6: "duplicate_url", 7: "blank_line",
        8: "download_failed", 9: "corrupt_image"}
    assert by_line[3]["text"] == "a line without its url"
    assert (by_line[4]["url"], by_line[4]["caption"]) == (served[1][0], "caf\\xe9 au lait")
    assert by_line[5]["caption"] == "a caption without its url"
    assert by_line[6]["detail"] == "same URL as line 2" and by_line[6]["url"] == served[0][0]
    assert (by_line[8]["url"], by_line[8]["caption"], by_line[8]["detail"]) == (
        f"{base}/gone.jpg", "a lost picture", "HTTP 404")
    assert (by_line[9]["url"], by_line[9]["caption"]) == (f"{base}/not_an_image.jpg", "an error page")
    assert by_line[9]["detail"] == "not an image (cannot identify image file)"
    assert [by_line[n]["stage"] for n in range(3, 10)] == ["list"] * 5 + ["download", "convert"]

    stats = json.loads((shards / "stats.json").read_text())
    assert stats["rejects"]["path"] == "rejects.jsonl" and stats["rejects"]["rows"] == 7
    (listed,) = stats["url_lists"]
    assert (listed["lines"], listed["header"], listed["pairs"], sum(listed["rejected"].values())) == (11, 1, 3, 7)

    assert main(["inspect", str(shards), "--png", str(tmp_path / "sheet.png"), "--samples", "3"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert f"rejects: 7 rows in {shards / 'rejects.jsonl'}" in out, out
    assert f"URL list {tmp_path / 'list.tsv'}: 11 lines = 1 header + 3 pairs written + 7 rejected" in out, out
