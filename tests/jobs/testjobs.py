"""Small entrypoints for the integration tests (imported inside the rank workers)."""

import time

import torch


def linear(ctx, config):
    """A tiny DDP regression that checkpoints, so tests can compare final parameters."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt = ctx.prepare(model, opt)
    ctx.restore()
    w_true = torch.arange(8, dtype=torch.float32)

    def batch(i):
        g = torch.Generator().manual_seed(i * 7 + ctx.rank)
        x = torch.randn(16, 8, generator=g)
        return x, x @ w_true

    for step, (x, y) in ctx.batches(batch, steps=config.get("steps", 30)):
        if step == config.get("return_at") and ctx.rank == 1:
            return None  # a rank that leaves the loop early (its data ran out, a `break`)
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.report(step, loss=loss.detach(), tokens=16)
        ctx.checkpoint(step)
        if config.get("fail_step") == step and ctx.rank == config.get("fail_rank", 1):
            raise ValueError(f"boom at step {step}")
        if config.get("sleep"):
            time.sleep(config["sleep"])
    return {"weights": [round(float(v), 6) for v in model.module.weight.flatten()] if hasattr(model, "module")
            else [round(float(v), 6) for v in model.weight.flatten()]}


def niceness(ctx, config):
    """Prints the training thread's niceness (per thread on Linux)."""
    import os

    print(f"niceness={os.getpriority(os.PRIO_PROCESS, 0)}")


def scaling(ctx, config):
    """A model of `width` parameters whose reported loss follows a known law of its training compute,
    L = 2 + 50 * (6 N D)^-0.3 (D: the tokens all ranks trained so far), for scaling sweeps."""
    torch.manual_seed(0)
    width, per_rank = config.get("width", 16), config.get("tokens", 1000)
    model = torch.nn.Linear(width - 1, 1)  # width parameters: width - 1 weights and a bias
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = ctx.prepare(model, opt)
    ctx.restore()
    for step, _ in ctx.batches(lambda i: i, steps=config.get("steps", 10)):
        tokens = step * per_rank * ctx.world_size
        ctx.report(step, loss=2.0 + 50.0 * (6.0 * width * tokens) ** -0.3, tokens=per_rank)
        ctx.checkpoint(step)


class _Blobs(torch.utils.data.Dataset):
    """Two classes of points, for `norm_and_dropout`."""

    def __init__(self, n: int = 512):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class _Counter:
    """State of the user's own: how many batches the run has trained on."""

    def __init__(self):
        self.batches = 0

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def norm_and_dropout(ctx, config):
    """A job shaped unlike the tiny GPT: BatchNorm (buffers each rank updates on its own batch), dropout
    (the RNG), gradient accumulation with DDP's no_sync, a map-style dataset shuffled per epoch, StepLR,
    and state of the user's own kept with `prepare(extra=...)`: an EMA of the weights, a counter."""
    import contextlib

    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(32, 2))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    seen = _Counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    model, opt = ctx.prepare(model, opt, sched, extra={"ema": ema, "seen": seen})
    ctx.restore()
    accum = 2
    for step, (x, y) in ctx.batches(_Blobs(), batch_size=16 * accum, steps=config.get("steps", 30)):
        opt.zero_grad(set_to_none=True)
        for i, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            with contextlib.nullcontext() if i == accum - 1 else model.no_sync():
                loss = F.cross_entropy(model(xs), ys) / accum
                loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        seen.batches += 1
        ctx.report(step, loss=loss.detach() * accum, grad_norm=grad_norm)
        ctx.checkpoint(step)
        if config.get("sleep"):
            time.sleep(config["sleep"])


def stuck_on_standby(ctx, config):
    """`linear`, but a spare on standby (no world yet: MASTER_PORT 0) never gets to its restore, as a
    function that waits on a group of its own before `ctx.prepare` would."""
    import os

    if os.environ.get("MASTER_PORT") == "0":
        time.sleep(3600)
    return linear(ctx, config)


class _ParamEMA:
    """An EMA of the prepared model's parameters, as users write one: under FSDP its tensors are DTensors
    sharded like the parameters, and `ctx.keep` saves each rank's share."""

    def __init__(self, model, decay: float = 0.9):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1 - self.decay)

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, state):
        for n, t in state.items():
            self.shadow[n].copy_(t)


def kept_ema(ctx, config):
    """A small MLP with an EMA of its prepared (for FSDP: sharded) parameters kept with `ctx.keep`."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, opt = ctx.prepare(model, opt)
    ema = _ParamEMA(model)
    ctx.keep("ema", ema)
    ctx.restore()

    def batch(i):
        g = torch.Generator().manual_seed(i * 31 + ctx.rank)
        x = torch.randn(32, 16, generator=g)
        return x, (x.sum(1) > 0).long()

    for step, (x, y) in ctx.batches(batch, steps=config.get("steps", 30)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        ctx.report(step, loss=loss.detach())
        ctx.checkpoint(step)
        if config.get("sleep"):
            time.sleep(config["sleep"])
