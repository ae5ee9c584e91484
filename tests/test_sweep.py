"""Sweeps over seeds x forget ratios (`mini-unlearn run --seeds ... --forget-ratio ...`): every
pair runs, the original trains once per seed, aggregates are the mean/std of the per-run values,
the table marks the best Avg.Gap, JSON and plot are written; bad arguments exit with code 2."""
import json
import re

import numpy as np
import pytest

from mini_unlearn import experiment
from mini_unlearn.cli import main
from mini_unlearn.experiment import aggregate, format_markdown, format_sweep_table

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = "retrain,finetune,ga"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("sweep")
    calls = []
    real = experiment._train_original

    def counting(cfg, seed, progress):
        calls.append(seed)
        return real(cfg, seed, progress)

    experiment._train_original = counting
    try:
        rc = main(["run", "--data", "digits", "--model", "logreg", "--methods", METHODS,
                   "--seeds", "0,1", "--forget-ratio", "0.1,0.3", "--json", str(out / "s.json"),
                   "--plot", str(out / "s.png"), "--markdown", str(out / "s.md")])
    finally:
        experiment._train_original = real
    assert rc == 0
    return dict(res=json.loads((out / "s.json").read_text()), out=out, calls=calls)


def test_every_pair_runs_and_trains_once_per_seed(sweep):
    res = sweep["res"]
    assert sweep["calls"] == [0, 1]
    pairs = [(r["config"]["seed"], r["config"]["forget_ratio"]) for r in res["runs"]]
    assert pairs == [(0, 0.1), (0, 0.3), (1, 0.1), (1, 0.3)]
    assert set(res["aggregates"]) == {"0.1", "0.3"}
    for r in res["runs"]:
        assert set(r["methods"]) == set(METHODS.split(","))
        assert r["methods"]["retrain"]["avg_gap"] == 0.0
        for m in r["methods"].values():
            for k in ("ua", "retain_acc", "test_acc", "mia_efficacy_svc", "avg_gap", "seconds",
                      "speedup", "rel_l2_to_retrain", "kl_to_retrain", "mia_loss", "mia_efficacy_4feat"):
                assert k in m
    # The same seed trains the same original: its metrics at both ratios share the test accuracy.
    r00, r01 = res["runs"][0], res["runs"][1]
    assert r00["original"]["test_acc"] == r01["original"]["test_acc"]


def test_aggregates_are_mean_and_std_of_runs(sweep):
    res = sweep["res"]
    for key, agg in res["aggregates"].items():
        runs = [r for r in res["runs"] if f"{r['config']['forget_ratio']:g}" == key]
        assert agg["seeds"] == [0, 1]
        for name, stats in agg["methods"].items():
            for metric, st in stats.items():
                vals = np.array([r["methods"][name][metric] for r in runs], dtype=float)
                vals = vals[np.isfinite(vals)]
                if vals.size == 0:
                    continue
                assert st["mean"] == pytest.approx(vals.mean(), rel=1e-12, abs=1e-15)
                assert st["std"] == pytest.approx(vals.std(ddof=1), rel=1e-9, abs=1e-15)
                assert st["n"] == vals.size
    # aggregate() is a pure function of the runs.
    assert aggregate(res["runs"]) == res["aggregates"]


def test_best_avg_gap_is_marked(sweep):
    res = sweep["res"]
    table = format_sweep_table(res)
    for key, agg in res["aggregates"].items():
        best = agg["best"]
        gaps = {n: m["avg_gap"]["mean"] for n, m in agg["methods"].items() if n != "retrain"}
        assert best["method"] == min(gaps, key=gaps.get)
        ru = best["runner_up"]
        assert best["lead"] == pytest.approx(gaps[ru] - gaps[best["method"]])
        assert best["lead_exceeds_runner_up_std"] == (best["lead"] > agg["methods"][ru]["avg_gap"]["std"])
        assert re.search(rf"^{best['method']}\*", table, re.M)
    assert "runner-up's std" in table
    md = (sweep["out"] / "s.md").read_text()
    assert md == format_markdown(res) + "\n" and "| method | UA |" in md
    assert (sweep["out"] / "s.png").stat().st_size > 5000


def _bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args,msg", [
    (["--seeds", ""], "--seeds is empty"),
    (["--seeds", ","], "--seeds"),
    (["--seeds", "0,x"], "integers"),
    (["--forget-ratio", "0.1,1.2"], "forget-ratio must be in \\(0, 1\\)"),
    (["--forget-ratio", "0,0.5"], "forget-ratio must be in \\(0, 1\\)"),
    (["--forget-ratio", ""], "--forget-ratio is empty"),
    (["--methods", "salun,magic"], "unknown method"),
])
def test_bad_sweep_arguments_exit_2(args, msg, capsys, tmp_path):
    err = _bad(["run", "--data", "digits", "--json", str(tmp_path / "x.json")] + args, capsys)
    assert re.search(msg, err), err


@pytest.mark.parametrize("args,msg", [
    (["--shadows", "0"], "--shadows must be an even number"),
    (["--shadows", "7"], "--shadows must be an even number"),
    (["--methods", "retrain,magic"], "unknown or unsupported"),
    (["--methods", "deltagrad"], "unknown or unsupported"),
])
def test_bad_audit_arguments_exit_2(args, msg, capsys):
    err = _bad(["audit", "--data", "digits"] + args, capsys)
    assert re.search(msg, err), err


def test_a_refusing_method_is_reported_not_fatal(tmp_path):
    """Mini-Unlearning refuses an AdamW log (UnsupportedTrainingError); the sweep records the
    refusal for that method, keeps the others, leaves it out of the ranking and prints it."""
    rc = main(["run", "--data", "digits", "--model", "mlp", "--optimizer", "adamw", "--epochs", "2",
               "--methods", "mini,retrain,finetune", "--seeds", "0", "--forget-ratio", "0.1,0.3",
               "--json", str(tmp_path / "a.json"), "--markdown", str(tmp_path / "a.md")])
    assert rc == 0
    res = json.loads((tmp_path / "a.json").read_text())
    mini = res["runs"][0]["methods"]["mini"]
    assert mini["skipped"].startswith("refused (UnsupportedTrainingError)")
    assert "avg_gap" in res["runs"][0]["methods"]["finetune"]
    agg = res["aggregates"]["0.1"]
    assert "skipped" in agg["methods"]["mini"] and agg["best"]["method"] == "finetune"
    assert "| mini | refused (UnsupportedTrainingError)" in (tmp_path / "a.md").read_text()
