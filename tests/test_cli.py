"""The `mini-unlearn run` experiment and CLI error handling (issue 5)."""
import json

import numpy as np
import pytest

from mini_unlearn.cli import main
from mini_unlearn.experiment import ALL_METHODS, Config, format_table, run_experiment


@pytest.fixture(scope="module")
def logreg_run():
    return run_experiment(Config(data="digits", model="logreg", forget_ratio=0.3), progress=False)


def test_logreg_lbfgs_run(logreg_run):
    res = logreg_run
    ms = res["methods"]
    assert set(ms) == set(ALL_METHODS) >= {"mini", "mini_retain", "deltagrad", "nabla_tau", "retrain",
                                           "finetune", "neggrad", "salun", "scrub", "rl", "ga"}
    assert "skipped" in ms["deltagrad"] and "sgd" in ms["deltagrad"]["skipped"]
    floor = res["retrain_noise_floor"]["rel_l2"]
    assert ms["mini_retain"]["rel_l2_to_retrain"] <= max(0.05, floor)
    assert abs(ms["mini"]["test_acc"] - ms["retrain"]["test_acc"]) <= 0.01 + 1e-9
    assert ms["mini"]["mode"] == "oneshot"
    assert res["dataset"]["n_forget"] == round(0.3 * res["dataset"]["n_train"])
    for m in ms.values():
        if "skipped" not in m:
            assert 0.0 <= m["mia_loss"] <= 1.0 and m["seconds"] > 0
            assert 0.0 <= m["mia_efficacy_svc"] <= 1.0 and m["avg_gap"] >= 0.0
    assert ms["retrain"]["avg_gap"] == 0.0 and ms["retrain"]["speedup"] == 1.0
    table = format_table(res)
    assert "mini_retain" in table and "noise floor" in table and "Avg.Gap" in table
    json.dumps(res)  # JSON-able


def test_sgd_recipe_deltagrad_history_is_far_larger():
    res = run_experiment(Config(data="digits", model="logreg", recipe="sgd", forget_ratio=0.1,
                                methods=("mini", "deltagrad", "retrain")), progress=False)
    ms = res["methods"]
    assert ms["mini"]["mode"] == "trajectory"
    assert ms["deltagrad"]["history_bytes"] >= 20 * ms["mini"]["history_bytes"]


def test_run_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["run", "--data", "digits", "--model", "logreg", "--methods", "mini,retrain",
                 "--forget-ratio", "0.1", "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"config", "dataset", "original", "methods", "retrain_noise_floor"}
    assert png.stat().st_size > 1000
    assert "mini" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["--methods", "mini,magic"], "unknown method"),
    (["--forget-ratio", "1.5"], "forget-ratio"),
    (["--forget-ratio", "0"], "forget-ratio"),
    (["--data", "/nonexistent/file.npz"], "No such file|not found|does not exist"),
])
def test_bad_arguments_exit_2_with_one_line(args, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["run", "--data", "digits", "--json", str(tmp_path / "x.json")] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(msg, err), err


def test_malformed_npz_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((10, 3)))  # no y
    with pytest.raises(SystemExit) as e:
        main(["run", "--data", str(bad), "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
