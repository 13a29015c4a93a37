"""The contrastive learners TUE names (SimCLR, MoCo, SimSiam): losses, MoCo's queue and momentum, DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, run_ue
from ue_lightning.modules.contrastive import build_learner, learner_optimizer

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _learner(method: str, **settings):
    torch.manual_seed(0)
    return build_learner(method, "resnet18", 3, 16, 4, **settings)


def _views(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return x, x.flip(3)


@pytest.mark.parametrize("method", ["simclr", "moco", "simsiam"])
def test_each_learner_falls_on_its_own_views_and_gives_features(method):
    net = _learner(method, **{"moco": {"queue_size": 24}, "simsiam": {"proj_dim": 64}}.get(method, {}))
    opt = learner_optimizer(method, [p for p in net.parameters() if p.requires_grad], lr=0.01)
    x, y = _views(8)
    losses = []
    for _ in range(12):
        net.before_step()
        loss = net.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.after_step(lambda t: t)
        losses.append(float(loss))
    # MoCo's first loss is against a random queue; from the second step on the queue holds this batch's keys
    first = losses[1] if method == "moco" else losses[0]
    assert losses[-1] < first, losses
    assert net.features(x).shape == (8, net.feature_dim)


def test_moco_queue_takes_every_ranks_keys_in_rank_order_and_wraps():
    net = _learner("moco", queue_size=10)
    x, y = _views(3)
    net.train()
    net.loss(x, y)  # symmetric: 6 keys
    mine = net._last_keys.clone()
    other = -mine  # another rank's keys
    net.after_step(lambda t: torch.stack([t, other]))  # what LightningModule.all_gather gives on 2 ranks
    # 12 keys into 10 slots from slot 0: the last 10 of (rank 0's 6, rank 1's 6) fill slots 0..9
    assert torch.equal(net.queue, torch.cat([mine, other])[-10:]) and int(net.queue_next) == 0
    net.loss(x, y)
    net.after_step(lambda t: t)  # one process: its 6 keys go to slots 0..5
    assert torch.equal(net.queue[:6], mine) and int(net.queue_next) == 6
    net.eval()
    net.loss(x, y)  # noise steps (eval mode) leave the queue alone
    net.after_step(lambda t: t)
    assert int(net.queue_next) == 6


def test_moco_momentum_moves_keys_towards_queries_and_asymmetric_queues_one_view():
    net = _learner("moco", queue_size=8, momentum=0.9, symmetric=False)
    key_before = [k.clone() for k in net.key_encoder.parameters()]
    with torch.no_grad():
        for q in net.encoder.parameters():
            q.add_(1.0)
    net.before_step()
    for k0, k, q in zip(key_before, net.key_encoder.parameters(), net.encoder.parameters()):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q)
    assert not any(k.requires_grad for k in net.key_encoder.parameters())
    x, y = _views(3)
    net.loss(x, y)
    assert torch.equal(net._last_keys, net.key(y).detach())  # asymmetric: the second view's keys only


@pytest.mark.parametrize("method", ["moco", "simsiam"])
def test_key_gradient_lets_the_noise_gradient_through_the_stopped_branch(method):
    net = _learner(method, **({"queue_size": 8} if method == "moco" else {"proj_dim": 32})).eval()
    x, y = _views(4)
    grads = {}
    for through in (False, True):
        xi = x.clone().requires_grad_(True)
        (grads[through],) = torch.autograd.grad(net.loss(xi, y.clone().requires_grad_(True), key_gradient=through),
                                                xi)
    assert not torch.allclose(grads[False], grads[True])
    assert all(p.grad is None for p in net.parameters())  # input gradients only


def test_simsiam_stops_the_gradient_of_its_targets():
    net = _learner("simsiam", proj_dim=32)
    x, y = _views(4)
    weights = list(net.encoder.parameters())

    def by_hand(stop: bool) -> torch.Tensor:
        z1, z2 = net.projection(net.features(x)), net.projection(net.features(y))
        p1, p2 = net.predictor(z1), net.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        cos = torch.nn.functional.cosine_similarity
        return -0.5 * (cos(p1, t2).mean() + cos(p2, t1).mean())

    grads = {name: torch.autograd.grad(loss, weights) for name, loss in
             (("loss", net.loss(x, y)), ("stopped", by_hand(True)), ("through", by_hand(False)))}
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads["loss"], grads["stopped"]))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads["loss"], grads["through"]))


def _moco_rank(rank: int, port: int, shards: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    net = _learner("moco", queue_size=32)
    net.train()
    x = shards[rank]
    net.loss(x, x.flip(3))

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    net.after_step(gather)
    out[rank] = net.queue.clone()
    dist.destroy_process_group()


def test_moco_queue_under_ddp_equals_one_process_seeing_both_shards():
    """Two gloo ranks, each a shard: both hold the queue one process builds from the shards' keys in rank order."""
    shards = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    one = _learner("moco", queue_size=32).train()
    keys = []
    for shard in shards:  # each rank's BatchNorm sees its own shard: so does this process, shard by shard
        one.loss(shard, shard.flip(3))
        keys.append(one._last_keys)
    expected = torch.cat(keys)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_moco_rank, args=(29517, shards, out), nprocs=2, join=True)
        queues = dict(out)
    for rank in (0, 1):
        assert torch.allclose(queues[rank][:16], expected, atol=1e-6), rank
    assert torch.equal(queues[0], queues[1])


@pytest.mark.slow
def test_moco_victim_fits_under_ddp_and_queues_both_ranks_keys(tmp_path):
    """`ue fit` of the MoCo victim on 2 CPU ranks: the checkpoint's queue pointer counts both ranks' keys."""
    cli = ["--config", str(REPO / "configs/victim/moco-digits.yaml"), "--data.train_subset", "64",
           "--data.batch_size", "8", "--model.init_args.queue_size", "1000", "--trainer.max_epochs", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp"]
    run_ue("fit", *cli, cwd=tmp_path, env=ONE_THREAD)
    state = torch.load(tmp_path / "runs/victim/moco-digits/checkpoints/last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    # 64 images, 2 ranks of 32, batches of 8: 4 steps, each queueing 2 ranks x 2 views x 8 keys
    assert int(state["net.queue_next"]) == 4 * 2 * 2 * 8
    assert torch.allclose(state["net.queue"].norm(dim=1), torch.ones(1000))
