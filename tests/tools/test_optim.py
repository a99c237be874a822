"""The package's Adam (one compiled update on CPU) against torch.optim.Adam: parameters and state
after several steps, parameters without gradients, checkpoints moved between the two, and the
settings it hands back to torch's own step."""
import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from seq2seq_fast.backends.extension import extension_error
from seq2seq_fast.tools.optim import Adam

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

SHAPES = [(201, 32), (96, 64), (96,), (1, 32), (7, 5, 3), (1,)]


def params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def run(optimizer_cls, dtype, steps=5, skip=(), **kwargs):
    """Parameters after ``steps`` updates from the same gradients; parameters whose index is in
    ``skip`` get no gradient on odd steps."""
    ps = params(dtype)
    opt = optimizer_cls(ps, lr=0.01, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(ps):
            p.grad = None if (i in skip and step % 2) else torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=str)
def test_updates_equal_torchs(dtype, tol):
    ours, opt = run(Adam, dtype, skip={2})
    theirs, ref = run(torch.optim.Adam, dtype, skip={2})
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], rtol=tol, atol=tol)
    assert float(opt.state[ours[2]]["step"]) == 3 and float(opt.state[ours[0]]["step"]) == 5


def test_it_really_updates_and_a_checkpoint_moves_both_ways():
    ours, opt = run(Adam, torch.float32, steps=3)
    before = [p.detach().clone() for p in params(torch.float32)]
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours, before)), "every parameter moved"
    theirs, ref = run(torch.optim.Adam, torch.float32, steps=3)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict keeps the tensors it is given)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for p, q in zip(ours, theirs):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1), dict(amsgrad=True), dict(maximize=True)], ids=str)
def test_other_settings_run_torchs_step(kwargs, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.seq2seq_fast, "adam_step_", lambda *a: calls.append(a), raising=False)
    ours, _ = run(Adam, torch.float64, **kwargs)
    theirs, _ = run(torch.optim.Adam, torch.float64, **kwargs)
    assert not calls
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_closure_is_called_once():
    ps = params(torch.float32)
    opt = Adam(ps, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        for p in ps:
            p.grad = torch.ones_like(p)
        return torch.tensor(1.0)

    opt.step(closure)
    assert calls == [1]


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a[1].pop(), "grads must hold"),
    (lambda a: a[4].__setitem__(0, torch.zeros(2)), "steps"),
    (lambda a: a[2].__setitem__(0, torch.zeros(3)), r"exp_avgs\[0\] must have shape"),
    (lambda a: a[1].__setitem__(0, torch.zeros(201, 32, dtype=torch.float64)), r"grads\[0\] must have dtype"),
    (lambda a: a[3].__setitem__(0, torch.zeros(32, 201).t()), r"exp_avg_sqs\[0\] must be contiguous"),
    (lambda a: a[5].__setitem__(0, 1), "groups must add up to the 2 params, got 1"),
    (lambda a: a[5].append(0), r"lr must hold 2 values"),
    (lambda a: a[6].__setitem__(0, -1.0), r"lr\[0\] must be a finite number >= 0"),
    (lambda a: a[8].__setitem__(0, 1.0), r"beta2\[0\] must be in \[0, 1\)"),
    (lambda a: a[9].__setitem__(0, 0.0), r"eps\[0\] must be a positive number"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_the_op_names_a_bad_argument_and_writes_nothing(mutate, match):
    ps = [torch.zeros(201, 32), torch.zeros(3)]
    args = [ps, [torch.ones_like(p) for p in ps], [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
            [torch.zeros(()), torch.zeros(())], [2], [0.1], [0.9], [0.999], [1e-8]]
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.seq2seq_fast.adam_step_(*args)
    assert float(args[4][-1]) == 0 and not ps[0].any(), "nothing is updated when an argument is bad"


def test_groups_with_their_own_settings_run_in_one_call(monkeypatch):
    """Two groups (one with a parameter left without gradient) take one op call and equal torch's."""
    real, calls = torch.ops.seq2seq_fast.adam_step_, []
    monkeypatch.setattr(torch.ops.seq2seq_fast, "adam_step_", lambda *a: (calls.append(a), real(*a)), raising=False)
    results = []
    for cls in (Adam, torch.optim.Adam):
        ps = params(torch.float64)
        opt = cls([{"params": ps[:3]}, {"params": ps[3:], "lr": 0.03, "betas": (0.8, 0.99), "eps": 1e-6}], lr=0.01)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            for i, p in enumerate(ps):
                p.grad = None if (i == 4 and step % 2) else torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
        results.append(ps)
    assert len(calls) == 4 and calls[1][5] == [3, 2] and calls[0][6] == [0.01, 0.03]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["non-contiguous grad", "sparse grad", "float16", "mixed dtypes"])
def test_what_the_op_does_not_take_runs_torchs_step(kind):
    """The op raises before writing anything; the same update then comes from torch's step."""
    results = []
    for cls in (Adam, torch.optim.Adam):
        ps = params(torch.float16 if kind == "float16" else torch.float32)
        if kind == "mixed dtypes":
            ps[1] = ps[1].detach().double().requires_grad_()
        opt = cls(ps, lr=0.01)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            if kind == "non-contiguous grad":
                ps[0].grad = torch.randn(32, 201, generator=g).t()
            if kind == "sparse grad":
                ps[2].grad = torch.randn(96, generator=g).to_sparse()
                with pytest.raises(RuntimeError, match="sparse"):  # torch's Adam refuses them too
                    opt.step()
                break
            opt.step()
        results.append(ps)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_hooks_and_the_profiler_see_each_step_once():
    """The step hooks (the optimizer's and global ones) run once per step, as on torch's Adam,
    also where the update falls back to torch's step after a torch Adam was built (torch wraps
    its class's step then); a profiler sees the step's range; without them the step still updates."""
    torch.optim.Adam(params(torch.float32), lr=0.01)  # torch wraps torch.optim.Adam.step in its hooks
    for settings in ({}, {"weight_decay": 0.1}):
        ps = params(torch.float32)
        opt = Adam(ps, lr=0.01, **settings)
        seen = []
        opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
        handle = register_optimizer_step_post_hook(lambda o, a, k: seen.append("global"))
        try:
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        finally:
            handle.remove()
        assert seen == ["pre", "post", "global"], settings
    before = ps[0].detach().clone()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#Adam.step" for e in prof.events())
    opt.step()
    assert (ps[0] - before).abs().min() > 0, "both steps updated"


def test_a_learning_rate_scheduler_drives_it_without_warnings(recwarn):
    ps = params(torch.float64)
    opt = Adam(ps, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_as_torchs(set_to_none):
    ps = params(torch.float32)
    opt = Adam(ps[:4], lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=set_to_none)
    for p in ps[:4]:
        assert p.grad is None if set_to_none else not p.grad.any()
    assert all(p.grad is not None and p.grad.all() for p in ps[4:]), "only the optimizer's parameters"
