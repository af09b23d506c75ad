import json

import pytest
import torch

from l2l_fused.cli import main
from l2l_fused.meta.evaluate import LEARNED, LEARNED_BF16


def test_main_job_writes_table_json_plot_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--no-progress", "--epochs", "1", "--iterations-per-epoch", "2",
            "--batch-size", "8", "--steps", "20", "--truncation", "10", "--val-functions", "8",
            "--test-functions", "16", "--tune-functions", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["variants"]["base"]
    assert set(results["optimizers"]) == {LEARNED, LEARNED_BF16, "SGD", "RMSprop", "Adam", "NAG"}
    for name, row in results["optimizers"].items():
        assert len(row["mean_loss_per_step"]) == 21
        assert (row["lr"] is None) == name.startswith("LSTM")
        assert f"| {name} |" in printed
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.pt").exists() and (out / "table.md").exists()

    # evaluate alone reproduces the learned optimizer's numbers from the checkpoint
    assert main(["evaluate", "--out", str(out), "--steps", "20", "--test-functions", "16", "--tune-functions", "16"]) == 0
    again = json.loads((out / "results.json").read_text())["variants"]["base"]
    assert again["optimizers"][LEARNED] == results["optimizers"][LEARNED]

    # resuming a finished run trains no more epochs
    assert main(argv + ["--resume"]) == 0
    assert "resumed" in capsys.readouterr().out


def test_mlp_run_evaluates_transfer_variants_and_exports(tmp_path, capsys):
    from test_data import write_mnist

    write_mnist(tmp_path, n=200)
    out = tmp_path / "mlp"
    data = ["--task", "mlp", "--data", "mnist", "--data-dir", str(tmp_path), "--out", str(out), "--no-progress"]
    recipe = ["--init", "mixed", "--param-scale", "0.5", "--init-net", "mlp-digits"]
    argv = ["run", *data, *recipe, "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2", "--steps", "4",
            "--truncation", "2", "--val-functions", "2", "--test-functions", "3", "--tune-functions", "2",
            "--variant", "relu", "--variant", "layers2"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    # Both initialisations of every variant, whatever the training mixture was.
    assert results["data"] == "mnist" and set(results["variants"]) == {"relu", "layers2", "relu-torch", "layers2-torch"}
    assert results["variants"]["relu"]["options"] == {"activation": "relu"} and results["variants"]["relu"]["init"] == "paper"
    assert results["variants"]["layers2-torch"]["options"] == {"hidden": [20, 20]}
    assert results["variants"]["layers2-torch"]["init"] == "torch"
    assert len(results["variants"]["relu"]["optimizers"][LEARNED]["mean_loss_per_step"]) == 5
    for name in ("relu", "layers2", "relu-torch", "layers2-torch"):
        assert (out / f"loss-{name}.png").exists()
    assert "variant relu, torch init" in capsys.readouterr().out

    exported = tmp_path / "mlp.pt"
    assert main(["export", "--task", "mlp", "--out", str(out), "--to", str(exported)]) == 0
    command = torch.load(exported, weights_only=True)["recipe"]
    assert command.startswith("python -m l2l_fused train --task mlp --data mnist --data-dir DATA_DIR --param-scale 0.5 "
                              "--init mixed --init-net mlp-digits --epochs 1 ")

    # evaluate takes the inits it is given
    assert main(["evaluate", *data, "--init", "torch", "--variant", "base", "--steps", "4", "--test-functions", "2",
                 "--tune-functions", "2"]) == 0
    assert set(json.loads((out / "results.json").read_text())["variants"]) == {"base-torch"}


def test_evaluate_rejects_unknown_variants_and_data_for_quadratics(tmp_path):
    with pytest.raises(SystemExit, match=r"--variant: mlp has variants \['base', 'hidden40', 'layers2', 'relu', 'steps200'\], not \['wide'\]"):
        main(["evaluate", "--task", "mlp", "--pretrained", "--out", str(tmp_path), "--variant", "wide"])
    with pytest.raises(SystemExit, match="--data: not an option of the quadratic task"):
        main(["train", "--task", "quadratic", "--data", "mnist", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--param-scale, --init: not an option of the quadratic task"):
        main(["train", "--task", "quadratic", "--init", "torch", "--param-scale", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"no shipped net or file 'nope.pt' \(shipped: \['quadratic', 'mlp', "):
        main(["train", "--task", "mlp", "--data", "digits", "--init-net", "nope.pt", "--out", str(tmp_path)])


def test_general_run_trains_on_the_mixture_then_runs_the_suite(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    out = tmp_path / "general"
    argv = ["run", "--task", "general", "--out", str(out), "--no-progress", "--init-net", "mlp", "--loss-scale", "1",
            "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "3", "--steps", "4", "--truncation", "2",
            "--val-functions", "3", "--test-functions", "2", "--tune-functions", "1",
            "--problem", "logistic/breast-cancer"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["problems"]) == {"logistic/breast-cancer"} and results["steps"] == 200
    checkpoint = str(out / "checkpoint.pt")
    assert set(results["problems"]["logistic/breast-cancer"]["optimizers"]) == {checkpoint, "AdamW", "AdamW (tuned)"}
    assert (out / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out suite: 2 test functions a problem, 200 steps" in capsys.readouterr().out

    exported = tmp_path / "general.pt"
    assert main(["export", "--task", "general", "--out", str(out), "--to", str(exported)]) == 0
    assert torch.load(exported, weights_only=True)["recipe"].startswith(
        "python -m l2l_fused train --task general --loss-scale 1.0 --init-net mlp --epochs 1 ")

    # evaluate --suite: shipped nets and files by --net, lr multipliers, its own steps
    suite = tmp_path / "suite"
    assert main(["evaluate", "--suite", "--out", str(suite), "--net", "mlp", "--net", str(exported), "--lr", "1",
                 "--lr", "2", "--steps", "6", "--test-functions", "2", "--tune-functions", "1",
                 "--problem", "autoencoder/digits"]) == 0
    optimizers = json.loads((suite / "results.json").read_text())["problems"]["autoencoder/digits"]["optimizers"]
    assert set(optimizers) == {"mlp", "mlp (lr 2)", str(exported), f"{exported} (lr 2)", "AdamW", "AdamW (tuned)"}
    assert len(optimizers["mlp (lr 2)"]["mean_loss_per_step"]) == 7


def test_suite_options_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--pretrained: with --suite, name the nets with --net"):
        main(["evaluate", "--suite", "--pretrained", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--loss-scale: not an option of the mlp task"):
        main(["train", "--task", "mlp", "--loss-scale", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["evaluate", "--suite", "--problem", "mnist", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--net, --lr: for the held-out suite only \(evaluate --suite"):
        main(["evaluate", "--task", "mlp", "--pretrained", "--net", "general", "--lr", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--problem: for the held-out suite only"):
        main(["run", "--task", "quadratic", "--problem", "cnn/digits", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--task general: its held-out evaluation is the suite"):
        main(["evaluate", "--task", "general", "--pretrained", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--variant: the general task is evaluated on the suite"):
        main(["run", "--task", "general", "--variant", "base", "--out", str(tmp_path)])


def test_neural_art_run_writes_the_pictures_for_every_variant(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "art"
    argv = ["run", "--task", "neural-art", "--out", str(out), "--no-progress", "--epochs", "1",
            "--iterations-per-epoch", "1", "--batch-size", "2", "--steps", "4", "--truncation", "2",
            "--val-functions", "2", "--test-functions", "2", "--tune-functions", "1"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["variants"]
    assert set(results) == {"base", "size128", "new-style"}
    assert results["size128"]["options"] == {"size": 128} and results["new-style"]["options"] == {"style": "dots"}
    for grid in ("grid.png", "grid-size128.png", "grid-new-style.png"):
        assert (out / grid).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out and (out / "loss-size128.png").exists()
    with pytest.raises(SystemExit, match="--init: not an option of the neural-art task"):
        main(["train", "--task", "neural-art", "--init", "torch", "--out", str(out)])
