import json

from l2l_fused.cli import main
from l2l_fused.meta.evaluate import LEARNED, LEARNED_BF16


def test_main_job_writes_table_json_plot_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--no-progress", "--epochs", "1", "--iterations-per-epoch", "2",
            "--batch-size", "8", "--steps", "20", "--truncation", "10", "--val-functions", "8",
            "--test-functions", "16", "--tune-functions", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["optimizers"]) == {LEARNED, LEARNED_BF16, "SGD", "RMSprop", "Adam", "NAG"}
    for name, row in results["optimizers"].items():
        assert len(row["mean_loss_per_step"]) == 21
        assert (row["lr"] is None) == name.startswith("LSTM")
        assert f"| {name} |" in printed
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.pt").exists() and (out / "table.md").exists()

    # evaluate alone reproduces the learned optimizer's numbers from the checkpoint
    assert main(["evaluate", "--out", str(out), "--steps", "20", "--test-functions", "16", "--tune-functions", "16"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["optimizers"][LEARNED] == results["optimizers"][LEARNED]

    # resuming a finished run trains no more epochs
    assert main(argv + ["--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
