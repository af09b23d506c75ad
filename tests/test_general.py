"""The general optimizer's problems: nn.Module optimizees run batched (vmap), the training mixture, the
corpora, and the held-out suite."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from l2l_fused.meta import SUITE, CompositeProblem, Family, GeneralTask, evaluate_suite
from l2l_fused.meta.data import DataError
from l2l_fused.meta.general import KINDS, draw_family
from l2l_fused.meta.models import MLP, SmallCNN, TinyTransformerLM
from l2l_fused.meta.suite import SuiteRun, table, targets
from l2l_fused.meta.text import CORPORA, VOCAB, corpus_splits, encode, load_corpus
from l2l_fused.pretrained_nets import load_net

pytest.importorskip("sklearn")

FAMILIES = {
    "mlp": Family("mlp", functools.partial(MLP, 64, (7, 5), 10, "gelu"), "digits"),
    "cnn-bn": Family("cnn-bn", functools.partial(SmallCNN, (1, 8, 8), (3, 4), 10, True), "digits", batch_size=5),
    "transformer": Family("lm", functools.partial(TinyTransformerLM, len(VOCAB), 8, 2, 2, 6), "python-source",
                          "next-token", batch_size=3, context=6),
    "autoencoder": Family("ae", functools.partial(MLP, 64, (6,), 64, "tanh"), "digits", "reconstruct", batch_size=4),
    "logistic": Family("logistic", functools.partial(MLP, 30, (), 2), "breast-cancer", batch_size=7),
}


def _direct_losses(problem, params, step):
    """Each function's loss computed alone: a real module holding that function's parameters."""
    x, y = problem.minibatch(step)
    losses = []
    for b in range(x.shape[0]):
        values = {n: p[b] * (1 if problem.scales is None else c[b])
                  for n, p, c in zip(problem.names, params, problem.scales or params)}
        out = functional_call(problem.model, values, (x[b],))
        if problem.objective == "reconstruct":
            loss = (out - x[b].flatten(1)).pow(2).mean()
        else:
            loss = F.cross_entropy(out.flatten(0, -2), y[b].flatten())
        losses.append(loss * (1 if problem.loss_scales is None else problem.loss_scales[b]))
    return torch.stack(losses)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scaled", [False, True])
def test_batched_losses_and_gradients_match_each_function_alone(name, scaled, seed):
    """vmap over B copies computes what each copy computes alone. Both in float64 (every operation here has
    a float64 kernel), where the two differ only by summation order: ~1e-16 relative per reduction."""
    options = {"param_scale": 0.7, "loss_scale": 1.5} if scaled else {}
    problem = FAMILIES[name].sample(3, torch.Generator().manual_seed(seed), "train", **options)
    problem.inputs = problem.inputs.double() if problem.inputs.is_floating_point() else problem.inputs
    problem.init = [p.double() for p in problem.init]
    if scaled:
        problem.scales = [c.double() for c in problem.scales]
        problem.loss_scales = problem.loss_scales.double()
    params = [p.clone().requires_grad_() for p in problem.init]
    batched = problem.loss(params, step=5)
    direct = _direct_losses(problem, params, 5)
    torch.testing.assert_close(batched, direct, rtol=1e-12, atol=1e-12)
    for g, h in zip(torch.autograd.grad(batched.sum(), params), torch.autograd.grad(direct.sum(), params)):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    assert batched.shape == (3,) and torch.isfinite(batched).all()


def test_random_scaling_starts_where_the_unscaled_function_does(seed):
    family = FAMILIES["mlp"]
    plain = family.sample(4, torch.Generator().manual_seed(seed), "train")
    scaled = family.sample(4, torch.Generator().manual_seed(seed), "train", param_scale=1.0, loss_scale=2.0)
    # Same draws up to the scales: same copies (seeded init), same minibatches once the seeds agree.
    scaled.seed = plain.seed
    unscaled_loss = plain.loss(plain.params, 0)
    torch.testing.assert_close(scaled.loss(scaled.params, 0), unscaled_loss * scaled.loss_scales, rtol=1e-5, atol=0)
    assert all(((c > math.exp(-1) - 1e-6) & (c < math.e + 1e-6)).all() for c in scaled.scales)
    assert not torch.allclose(scaled.params[0], plain.params[0])


def test_minibatches_are_fixed_per_function_and_survive_sharding(seed):
    problem = FAMILIES["transformer"].sample(4, torch.Generator().manual_seed(seed), "val")
    x, y = problem.minibatch(3)
    assert x.shape == y.shape == (4, 3, 6)
    torch.testing.assert_close(x[..., 1:], y[..., :-1])  # targets are the next characters
    again = problem.minibatch(3)
    assert torch.equal(x, again[0]) and not torch.equal(x, problem.minibatch(4)[0])
    half = problem.shard(1, 2)
    assert torch.equal(half.minibatch(3)[0], x[2:]) and half.params[0].shape[0] == 2
    torch.testing.assert_close(half.loss(half.params, 3), problem.loss(problem.params, 3)[2:])
    splits = corpus_splits("python-source")
    assert torch.equal(problem.inputs, splits["val"])


def test_models_with_running_statistics_are_refused():
    family = Family("bn", lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)), "breast-cancer")
    with pytest.raises(ValueError, match="bn: the model has buffers"):
        family.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="objective must be one of"):
        Family("x", MLP, "digits", "regress")
    with pytest.raises(ValueError, match="data must be one of"):
        Family("x", MLP, "fashion")
    with pytest.raises(ValueError, match="split must be one of"):
        FAMILIES["mlp"].sample(2, torch.Generator(), "holdout")


def test_composite_problem_runs_its_parts_side_by_side(seed):
    parts = [FAMILIES[n].sample(2, torch.Generator().manual_seed(seed + i), "test")
             for i, n in enumerate(("mlp", "logistic"))]
    problem = CompositeProblem(parts)
    assert len(problem.params) == len(parts[0].params) + len(parts[1].params)
    expected = torch.cat([p.loss(p.params, 2) for p in parts])
    torch.testing.assert_close(problem.loss(problem.params, 2), expected)
    torch.testing.assert_close(problem.to("cpu").loss(problem.params, 2), expected)
    torch.testing.assert_close(problem.shard(0, 2).loss([p[:1] for p in problem.params], 2), expected[[0, 2]])


def test_general_task_mixes_every_kind_and_scales_only_training_functions(seed):
    task = GeneralTask()
    train = task.sample(6, torch.Generator().manual_seed(seed), "train")
    assert len(train.parts) == len(KINDS) and all(p.params[0].shape[0] == 2 for p in train.parts)
    assert [p.objective for p in train.parts] == ["classify", "classify", "next-token"]
    assert all(p.scales is not None and p.loss_scales is not None for p in train.parts)
    val = task.sample(3, torch.Generator().manual_seed(seed), "val")
    assert all(p.scales is None and p.loss_scales is None for p in val.parts)
    again = task.sample(3, torch.Generator().manual_seed(seed), "val")
    torch.testing.assert_close(val.loss(val.params, 1), again.loss(again.params, 1))
    with pytest.raises(ValueError, match="n_functions must be a multiple of 3, got 4"):
        task.sample(4, torch.Generator())
    with pytest.raises(ValueError, match="loss_scale must be >= 0"):
        GeneralTask(loss_scale=-1.0)
    names = {draw_family(kind, torch.Generator().manual_seed(s)).name for kind in KINDS for s in range(20)}
    assert any(n.endswith("-bn") for n in names) and any(n.startswith("transformer") for n in names)
    with pytest.raises(ValueError, match="kind must be one of"):
        draw_family("rnn", torch.Generator())


def test_corpora_encode_to_the_vocabulary_and_split_disjointly():
    assert encode("a\n~é") .tolist() == [VOCAB.index("a"), 0, VOCAB.index("~"), VOCAB.index("?")]
    for name in CORPORA:
        tokens = load_corpus(name)
        assert len(tokens) > 200_000 and int(tokens.max()) < len(VOCAB) and int(tokens.min()) >= 0
        splits = corpus_splits(name)
        assert sum(len(s) for s in splits.values()) == len(tokens)
        assert torch.equal(torch.cat(list(splits.values())), tokens)
    with pytest.raises(ValueError, match="corpus must be one of"):
        load_corpus("shakespeare")


def test_a_corrupt_corpus_is_named(tmp_path, monkeypatch):
    import l2l_fused.meta.text as text

    (tmp_path / "python-docs.txt.gz").write_bytes(b"not gzip")
    monkeypatch.setattr(text, "CORPORA_DIR", str(tmp_path))
    text.load_corpus.cache_clear()
    try:
        with pytest.raises(DataError, match="python-docs.txt.gz: cannot read the corpus"):
            text.load_corpus("python-docs")
    finally:
        text.load_corpus.cache_clear()


def _run(name, final, initial=2.0, max_abs=1.0, steps=20):
    losses = torch.full((steps + 1, 2), final)
    losses[0] = initial
    return SuiteRun(name, 1.0, losses, max_abs)


def test_suite_targets_flag_divergence_unbounded_parameters_and_losses():
    adamw, tuned = _run("AdamW", 1.0), _run("AdamW (tuned)", 0.5, max_abs=2.0)
    good = targets(_run("net", 0.9), adamw, tuned)
    assert good["no_divergence"] and good["within"] and good["better"]
    close = targets(_run("net", 1.1), adamw, tuned)
    assert close["within"] and not close["better"]
    assert not targets(_run("net", 1.3), adamw, tuned)["within"]
    assert not targets(_run("net", float("nan")), adamw, tuned)["no_divergence"]
    assert not targets(_run("net", 2.5), adamw, tuned)["no_divergence"]  # above its initial loss
    unbounded = targets(_run("net", 0.5, max_abs=34.0), adamw, tuned)
    assert not unbounded["bounded"] and not unbounded["no_divergence"]


def test_suite_problems_are_held_out_from_the_training_mixture():
    training = {draw_family(k, torch.Generator().manual_seed(s)).data for k in KINDS for s in range(10)}
    assert training == {"mnist5k-14", "python-docs"}
    assert not {family.data for family in SUITE.values()} & training


def test_suite_runs_a_problem_and_tabulates_it(seed):
    results = evaluate_suite({"mlp": load_net("mlp")}, lrs=[1.0, 0.5], steps=12, test_functions=2, tune_functions=1,
                             seed=seed % 1000, problems=["logistic/breast-cancer"], log=lambda _: None)
    entry = results["logistic/breast-cancer"]
    assert [r.name for r in entry["runs"]] == ["mlp", "mlp (lr 0.5)", "AdamW", "AdamW (tuned)"]
    assert set(entry["targets"]) == {"mlp", "mlp (lr 0.5)"}
    assert all(r.losses.shape == (13, 2) for r in entry["runs"])
    assert "| logistic/breast-cancer | AdamW (tuned, lr" in table(results)
    with pytest.raises(ValueError, match="problems must be among"):
        evaluate_suite({"mlp": load_net("mlp")}, problems=["mnist"])
    with pytest.raises(TypeError, match="one LSTMOptimizerNet on every parameter"):
        evaluate_suite({"conv": load_net("conv")})
