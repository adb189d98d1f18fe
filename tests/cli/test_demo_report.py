"""The demo's closing report (albef_ds/cli/demo.py), without running the demo: both rankings
of the trained model are shown, the headline names which ranking each figure is, and the
chance row has real R@5/R@10 values, never 'nan'."""
from albef_ds.cli.demo import headline, results_table
from albef_ds.eval.retrieval import chance_metrics


def result(itc_r1: float, itm_r1: float, both_r1: float = 0.0) -> dict:
    """An evaluate() result on 100 images x 5 captions with the given R@1 (both ways) by ITC,
    by ITM and by ITM + ITC."""
    m = {"k_test": 16, "num_images": 100, "num_texts": 500, **chance_metrics([[0] * 5] * 100, 500, 100)}
    for prefix, r1 in (("itc_", itc_r1), ("itm_", itm_r1), ("itm_itc_", both_r1)):
        m.update({f"{prefix}txt_r1": r1, f"{prefix}img_r1": r1 / 2, f"{prefix}txt_r5": 3 * r1,
                  f"{prefix}img_r5": 1.5 * r1, f"{prefix}txt_r10": 4 * r1, f"{prefix}img_r10": 2 * r1,
                  f"{prefix}r_mean": 2 * r1})
    return m


def test_the_table_shows_itc_only_and_itm_reranked_rows_and_real_chance_values():
    table = results_table(result(1.0, 1.0, 1.0), result(7.6, 5.9, 8.1), k=16)
    rows = {line[:32].strip(): line[32:].split() for line in table.splitlines()[1:]}
    assert rows["trained, ITC only"][0] == "7.60" and rows["trained, ITM re-rank k=16"][0] == "5.90"
    assert rows["trained, ITM + ITC re-rank k=16"][0] == "8.10"
    assert "untrained, ITC only" in rows and "untrained, ITM re-rank k=16" in rows
    assert "nan" not in table
    chance = rows["chance"]
    assert chance[:3] == ["1.00", "4.92", "9.65"]  # TR: 1 - C(495, k) / C(500, k)
    assert chance[3:6] == ["1.00", "5.00", "10.00"]  # IR: k / 100
    # the columns and rows are explained under the table
    assert "txt_r1/r5/r10 = text retrieval" in table and "img_r1/r5/r10 = image retrieval" in table
    assert "r_mean = their mean" in table and "ITM re-rank k re-orders ITC's top k" in table


def test_the_headline_names_which_ranking_each_figure_is_and_the_better_one():
    text = headline(result(7.6, 5.9, 1.0))
    itc_line, itm_line, both_line, verdict = text.splitlines()
    assert itc_line.startswith("trained, ITC only:") and "TR@1 7.60% = 8x chance" in itc_line
    assert itm_line.startswith("trained, ITM re-ranked:") and "TR@1 5.90%" in itm_line and "top 16" in itm_line
    assert "top 16" not in itc_line
    assert both_line.startswith("trained, ITM + ITC re-ranked:") and "TR@1 1.00%" in both_line
    assert verdict.startswith("better R@1 here (TR@1 + IR@1): ITC only")
    assert headline(result(3.0, 9.0, 1.0)).splitlines()[3].startswith("better R@1 here (TR@1 + IR@1): ITM re-ranked")
    assert headline(result(3.0, 2.0, 4.0)).splitlines()[3].startswith("better R@1 here (TR@1 + IR@1): ITM + ITC")
    assert "tie: ITC only, ITM re-ranked" in headline(result(3.0, 3.0, 1.0))


def test_the_compositional_table_and_the_itm_line_state_chance_and_the_prior():
    from albef_ds.cli.demo import compositional_table, itm_line
    untrained = {"n": 500, "num_candidates": 4, "chance": 25.0, "itc_acc": 24.1, "itm_acc": 26.0}
    trained = dict(untrained, itc_acc=31.5, itm_acc=47.25)
    lines = compositional_table(untrained, trained).splitlines()
    assert "500 images" in lines[0] and "among 4" in lines[0]
    assert "by ITC" in lines[1] and "by ITM" in lines[1]
    assert lines[3].split() == ["trained", "31.50%", "47.25%"]
    assert lines[4].split() == ["chance", "25.00%", "25.00%"]
    assert itm_line(0.7512) == ("ITM training accuracy (last 10 % of steps): 75.1 % "
                                "(prior, always 'no match': 66.7 %)")
    assert itm_line(None).endswith("not logged")


def test_the_warm_start_runs_a_smaller_demo_unless_told_otherwise():
    import argparse

    from albef_ds.cli.demo import add_arguments, run_size
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run_size(p.parse_args([])) == (1000, 1000)
    assert run_size(p.parse_args(["--warm-start"])) == (500, 200)
    assert run_size(p.parse_args(["--warm-start", "--steps", "7", "--test-images", "30"])) == (7, 30)
    assert run_size(p.parse_args(["--steps", "0"])) == (0, 1000)
