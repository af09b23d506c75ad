"""L2LOptimizer inside training stacks that nobody here wrote: Lightning, transformers' Trainer, Accelerate.

Each test hands the optimizer to the stack the way its documentation says any ``torch.optim`` optimizer is
handed over, lets the stack build or drive an LR scheduler on it, trains a few steps on the CPU and checks
that the loss falls and that the learning rate the stack logs (or the optimizer holds) follows the schedule.
What they exercise that no other test does: the stacks' own wrappers (Lightning's ``LightningOptimizer`` and
closure-driven ``step``, Accelerate's ``AcceleratedOptimizer``, which round-trips ``state_dict`` /
``load_state_dict`` when it is made, and ``AcceleratedScheduler``), their schedulers on the group's ``lr``,
their loggers reading ``lr`` and ``weight_decay``, and Accelerate's checkpoint save and load.

The packages are in ``extras_require["test"]``; where one is missing its test is skipped. Nothing is
downloaded: the data are scikit-learn's bundled digits and a fixed token pattern, the transformer is built
from a config with random weights.
"""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2l_fused import L2LOptimizer, pretrained
from l2l_fused.meta import load_digits

# transformers (and Accelerate through huggingface_hub) must never reach for the hub: set before they load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _digits_mlp() -> nn.Module:
    """The shipped "mlp-digits" net's task: a sigmoid MLP on the 8×8 digits, where it gets the loss down fast."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))


def _digits(seed: int, batch_size: int = 64) -> torch.utils.data.DataLoader:
    data = load_digits()
    dataset = torch.utils.data.TensorDataset(data.images, data.labels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def _falls(losses: list[float], k: int = 3, ratio: float = 0.5) -> bool:
    """The mean of the last ``k`` losses is under ``ratio`` times that of the first ``k``."""
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return math.isfinite(last) and last < ratio * first


def _schedule(make_scheduler, steps: int, lr: float) -> list[float]:
    """The lr a scheduler gives after 0, 1, ..., ``steps`` steps, from the same scheduler on a plain SGD."""
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(sgd)
    values = [sgd.param_groups[0]["lr"]]
    for _ in range(steps):
        sgd.step()
        scheduler.step()
        values.append(sgd.param_groups[0]["lr"])
    return values


# --------------------------------------------------------------------------------------------- Lightning

LIGHTNING_STEPS, LIGHTNING_LOG_EVERY = 24, 4


def _one_cycle(optimizer):
    # cycle_momentum=False: L2LOptimizer has no momentum (nor betas) for OneCycleLR to cycle.
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=LIGHTNING_STEPS, pct_start=0.25,
                                               div_factor=2.0, final_div_factor=5.0, cycle_momentum=False)


def test_lightning_trainer_steps_schedules_and_logs_lr(tmp_path, seed):
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _digits_mlp()
            self.losses: list[float] = []
            self.lrs_at_step: list[float] = []

        def training_step(self, batch, batch_idx):
            images, labels = batch
            loss = F.cross_entropy(self.model(images), labels)
            self.losses.append(loss.item())
            self.lrs_at_step.append(float(self.optimizers().param_groups[0]["lr"]))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            opt = L2LOptimizer(self.parameters(), net=pretrained("mlp-digits"), lr=1.0, weight_decay=0.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": _one_cycle(opt), "interval": "step"}}

    torch.manual_seed(seed)
    module = Classifier()
    trainer = pl.Trainer(
        max_steps=LIGHTNING_STEPS, log_every_n_steps=LIGHTNING_LOG_EVERY, accelerator="cpu", devices=1,
        logger=CSVLogger(tmp_path, name="l2l"),
        callbacks=[LearningRateMonitor(logging_interval="step", log_weight_decay=True)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=_digits(seed))

    assert trainer.global_step == LIGHTNING_STEPS
    assert len(module.losses) == LIGHTNING_STEPS
    assert _falls(module.losses), module.losses
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, L2LOptimizer)
    assert optimizer.skipped_coordinates().item() == 0

    # The lr each optimizer step ran with is OneCycleLR's, step by step (the scheduler drove our group's lr).
    expected = _schedule(_one_cycle, LIGHTNING_STEPS, 1.0)
    assert module.lrs_at_step == pytest.approx(expected[:LIGHTNING_STEPS], rel=1e-6)

    # LearningRateMonitor logs at batch start, at step s = n-1, 2n-1, ... (every log_every_n_steps): the lr the
    # coming step runs with, i.e. the schedule after s steps; and the group's weight_decay beside it.
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    lr_key = "lr-L2LOptimizer"
    logged = {int(r["step"]): float(r[lr_key]) for r in rows if r.get(lr_key)}
    want_steps = list(range(LIGHTNING_LOG_EVERY - 1, LIGHTNING_STEPS, LIGHTNING_LOG_EVERY))
    assert sorted(logged) == want_steps, rows
    for step, value in logged.items():
        assert value == pytest.approx(expected[step], rel=1e-6), (step, logged)
    assert len(set(round(v, 6) for v in logged.values())) == len(logged)  # it moved: up, then down
    decays = [float(r[lr_key + "-weight_decay"]) for r in rows if r.get(lr_key + "-weight_decay")]
    assert decays == [0.0] * len(want_steps)
    assert any(r.get("train_loss") for r in rows)


# ------------------------------------------------------------------------------------ transformers Trainer

VOCAB, SEQ_LEN = 16, 32


class _CountingSequences(torch.utils.data.Dataset):
    """Sequences (i, i+1, i+2, ...) mod VOCAB: a tiny LM learns the next token quickly."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = (torch.arange(SEQ_LEN) + i) % VOCAB
        return {"input_ids": ids, "labels": ids.clone()}


def test_transformers_trainer_builds_its_linear_schedule_on_l2loptimizer(tmp_path, seed):
    transformers = pytest.importorskip("transformers")

    max_steps, logging_steps, base_lr = 12, 2, 0.3
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    opt = L2LOptimizer(model.parameters(), net=pretrained("mlp-digits"), lr=base_lr, weight_decay=0.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, logging_steps=logging_steps,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed % 2**31,
        dataloader_num_workers=0,  # learning_rate is left at its default: the Trainer must not apply it to ours
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_CountingSequences(), optimizers=(opt, None))
    trainer.train()

    assert trainer.state.global_step == max_steps
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == list(range(logging_steps, max_steps + 1, logging_steps))
    losses = [entry["loss"] for entry in logs]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.5 * losses[0], losses
    # The default scheduler is linear from our lr to 0 over max_steps, no warm-up. The Trainer logs the lr of
    # the step it just took (read before the scheduler steps): base_lr * (1 - (step - 1) / max_steps).
    for entry in logs:
        assert entry["learning_rate"] == pytest.approx(base_lr * (1 - (entry["step"] - 1) / max_steps), rel=1e-6), logs
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.0, abs=1e-12)
    assert opt.skipped_coordinates().item() == 0


# ------------------------------------------------------------------------------------------------ Accelerate

ACCELERATE_STEPS = 20


@pytest.mark.parametrize("variant", ["float lr", "tensor lr, named parameters"])
def test_accelerate_prepared_training_schedules_and_resumes(tmp_path, seed, variant):
    accelerate = pytest.importorskip("accelerate")

    torch.manual_seed(seed)
    model = _digits_mlp()
    if variant == "float lr":
        opt = L2LOptimizer(model.parameters(), net=pretrained("mlp-digits"), lr=1.0, weight_decay=0.0)
    else:
        opt = L2LOptimizer(model.named_parameters(), net=pretrained("mlp-digits"), lr=torch.tensor(1.0), weight_decay=0.0)
    make_scheduler = lambda o: torch.optim.lr_scheduler.LinearLR(  # noqa: E731
        o, start_factor=1.0, end_factor=0.25, total_iters=ACCELERATE_STEPS)
    sched = make_scheduler(opt)
    accelerator = accelerate.Accelerator(cpu=True)
    model, prepared_opt, sched, loader = accelerator.prepare(model, opt, sched, _digits(seed))
    # AcceleratedOptimizer.__init__ ran state_dict() / load_state_dict() on our optimizer: still ours, intact.
    assert prepared_opt.optimizer is opt
    assert isinstance(opt.param_groups[0]["lr"], float if variant == "float lr" else torch.Tensor)
    if variant != "float lr":
        assert opt.param_groups[0]["param_names"] == [name for name, _ in _digits_mlp().named_parameters()]

    def run(batches):
        losses, lrs = [], []
        for images, labels in batches:
            lrs.append(float(opt.param_groups[0]["lr"]))
            loss = F.cross_entropy(model(images), labels)
            accelerator.backward(loss)
            prepared_opt.step()
            sched.step()
            prepared_opt.zero_grad()
            losses.append(loss.item())
        return losses, lrs

    batches = iter(loader)
    batches = [next(batches) for _ in range(ACCELERATE_STEPS)]
    half = ACCELERATE_STEPS // 2
    losses, lrs = run(batches[:half])
    accelerator.save_state(str(tmp_path / "checkpoint"))
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved_state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    saved_lr = float(opt.param_groups[0]["lr"])

    second_half, second_lrs = run(batches[half:])
    losses, lrs = losses + second_half, lrs + second_lrs
    assert _falls(losses), losses
    expected = _schedule(make_scheduler, ACCELERATE_STEPS, 1.0)
    assert lrs == pytest.approx(expected[:ACCELERATE_STEPS], rel=1e-6)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.25)
    assert opt.skipped_coordinates().item() == 0
    final_params = [p.detach().clone() for p in model.parameters()]

    # Resume from the checkpoint (Accelerate reloads the optimizer's state dict with torch.load(weights_only=True)):
    # parameters, LSTM state and the scheduled lr come back as saved, and the same batches retrace the same run.
    lr_tensor = opt.param_groups[0]["lr"]
    accelerator.load_state(str(tmp_path / "checkpoint"))
    for p, saved in zip(model.parameters(), saved_params):
        torch.testing.assert_close(p.detach(), saved, rtol=0, atol=0)
    for p, saved in zip(model.parameters(), saved_state):
        assert set(opt.state[p]) == set(saved)
        for key, value in saved.items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=0)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(saved_lr, rel=1e-6)
    if variant != "float lr":
        assert opt.param_groups[0]["lr"] is lr_tensor  # the live tensor, the saved value written into it
    resumed, resumed_lrs = run(batches[half:])
    assert resumed_lrs == pytest.approx(second_lrs, rel=1e-6)
    assert resumed == second_half
    for p, final in zip(model.parameters(), final_params):
        torch.testing.assert_close(p.detach(), final, rtol=0, atol=0)
