"""DDP on 2 gloo processes (CPU) against one process on the concatenated global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pathflow.train import TrainConfig
from pathflow.train.distributed import init_distributed
from pathflow.train.losses import NTXentLoss
from pathflow.train.trainer import build_method, wrap_ddp

WORLD = 2
CPU = torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _spawn(fn: Any, *args: Any) -> None:
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


# ------------------------------------------------------------------------------ NT-Xent
def _ntxent_worker(rank: int, port: int, tmp: str) -> None:
    _join(rank, port)
    info = init_distributed("cpu")
    data = torch.load(Path(tmp) / "z.pt")
    n = data["a"].shape[0] // WORLD
    a = data["a"][rank * n : (rank + 1) * n].clone().requires_grad_(True)
    b = data["b"][rank * n : (rank + 1) * n].clone().requires_grad_(True)
    loss = NTXentLoss(0.2)(a, b)
    loss.backward()
    torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad}, Path(tmp) / f"r{info.rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ntxent_gathers_negatives_across_ranks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    torch.save({"a": a, "b": b}, tmp_path / "z.pt")
    _spawn(_ntxent_worker, str(tmp_path))
    ref_a, ref_b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref = NTXentLoss(0.2)(ref_a, ref_b)
    ref.backward()
    assert ref_a.grad is not None and ref_b.grad is not None
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(WORLD)]
    # the global loss is the mean of the per-rank losses (equal local batches) ...
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / WORLD, ref.detach())
    # ... and DDP's gradient averaging turns each rank's gradient into the global one
    torch.testing.assert_close(torch.cat([r[0]["ga"], r[1]["ga"]]) / WORLD, ref_a.grad)
    torch.testing.assert_close(torch.cat([r[0]["gb"], r[1]["gb"]]) / WORLD, ref_b.grad)


# ---------------------------------------------------------------- methods under DDP
def _method_cfg(method: str) -> TrainConfig:
    common: dict[str, Any] = {"arch": "vit_tiny_patch16_224", "img_size": 32, "steps": 10}
    if method == "dino":
        dino = {"out_dim": 128}
        return TrainConfig(method="dino", options=dino, drop_path_rate=0.0, **common).resolve()
    simclr = {"proj_hidden_dim": 64, "proj_dim": 16}
    return TrainConfig(method="simclr", options=simclr, **common).resolve()


def _step_grads(model: torch.nn.Module, method: Any, views: list[torch.Tensor]) -> dict[str, Any]:
    """One training step: loss, gradients, then AdamW + EMA; returns what to compare."""
    from pathflow.train.trainer import build_optimizer, set_schedules

    opt = build_optimizer(method, _method_cfg(method.views_preset), CPU)
    set_schedules(opt, 1e-3, 0.04)
    out = model(views, 0)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.before_optimizer_step(0)
    opt.step()
    method.after_step(0)  # DINO: centre and teacher updates
    buffers = {n: b.clone() for n, b in method.named_buffers()}
    return {"loss": out["loss"].detach(), "grads": grads, "buffers": buffers,
            "state": method.state_dict(),
            "not_broadcast": sorted(getattr(model, "parameters_to_ignore", []))}  # fmt: skip


def _assert_close_norm(got: torch.Tensor, want: torch.Tensor, name: str, floor: float) -> None:
    """Equal up to float32 summation order: the error norm is below 1e-4 of the tensor's norm,
    or of ``floor`` (a scale for tensors that are zero up to rounding, such as the gradient
    of a bias followed by a batch norm)."""
    if not want.is_floating_point():
        assert torch.equal(got, want), name
        return
    err = (got.double() - want.double()).norm().item()
    assert err <= 1e-4 * max(want.double().norm().item(), floor), (name, err)


def _total_norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().norm() ** 2 for t in tensors.values() if t.is_floating_point()))


def _ddp_worker(rank: int, port: int, method_name: str, tmp: str) -> None:
    _join(rank, port)
    info = init_distributed("cpu")
    method = build_method(_method_cfg(method_name), CPU)
    model = wrap_ddp(method, info)
    views = torch.load(Path(tmp) / "views.pt")
    local = [v.chunk(WORLD)[rank] for v in views]
    torch.save(_step_grads(model, method, local), Path(tmp) / f"r{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method_name", ["dino", "simclr"])
def test_ddp_gradients_match_one_process_on_the_global_batch(
    sample_shards: Path, tmp_path: Path, method_name: str
) -> None:
    from pathflow.data import create_views, make_loader

    views_spec = (
        create_views("dino", global_size=32, local_size=16, num_local=2)
        if method_name == "dino"
        else create_views("simclr", global_size=32)
    )
    loader = make_loader(
        sample_shards, views=views_spec, batch_size=8, backend="torch", num_workers=0,
        rank=0, world_size=1, device="cpu",
    )  # fmt: skip
    views = next(iter(loader)).views  # one real global batch of 8 images
    torch.save(views, tmp_path / "views.pt")
    _spawn(_ddp_worker, method_name, str(tmp_path))

    method = build_method(_method_cfg(method_name), CPU)
    single = _step_grads(method, method, views)
    ranks = [torch.load(tmp_path / f"r{i}.pt") for i in range(WORLD)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / WORLD, single["loss"])
    assert set(ranks[0]["grads"]) == set(single["grads"]) and single["grads"]
    floor = 1e-3 * _total_norm(single["grads"]) ** 0.5
    for name, g in single["grads"].items():
        # DDP leaves the same averaged gradient on every rank
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name])
        _assert_close_norm(ranks[0]["grads"][name], g, name, floor)
    # DINO's centre (all-reduced teacher mean, not re-broadcast by DDP every step) /
    # SimCLR's global BN statistics
    want = ["loss.center"] if method_name == "dino" else []
    assert ranks[0]["not_broadcast"] == ranks[1]["not_broadcast"] == want
    if method_name == "dino":
        assert torch.count_nonzero(single["buffers"]["loss.center"]) > 0
    for name, buf in single["buffers"].items():
        _assert_close_norm(ranks[0]["buffers"][name], buf, name, 1e-6)
        _assert_close_norm(ranks[1]["buffers"][name], buf, name, 1e-6)
    # after AdamW and the EMA update, student and teacher are identical on both ranks (a
    # comparison with the single process would be meaningless here: Adam's first step is
    # lr * sign(grad), and some gradients are zero up to rounding, e.g. attention key biases)
    assert ranks[0]["state"].keys() == single["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name


# ------------------------------------------------------------------ the trainer, 2 ranks
def _train_worker(rank: int, port: int, shards: str, out: str) -> None:
    from pathflow.train import train

    _join(rank, port)
    cfg = TrainConfig(
        method="dino", arch="vit_tiny_patch16_224", img_size=32, global_size=32,
        local_size=16, num_local=2, options={"out_dim": 128}, data=shards, out=out, steps=2,
        batch_size=4, loader_backend="torch", num_workers=0, tensorboard=False, device="cpu",
    )  # fmt: skip
    summary = train(cfg, progress=False)
    assert not dist.is_initialized()  # the trainer created the group and destroyed it
    torch.save(
        {"world_size": summary.world_size, "steps": summary.steps}, Path(out) / f"r{rank}.pt"
    )


@pytest.mark.slow
def test_trainer_runs_on_two_gloo_processes(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    _spawn(_train_worker, str(sample_shards), str(out))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2 and len(ckpt["rank_states"]) == 2
    assert ckpt["config"]["steps_per_epoch"] == 5  # 43 patches: 21 per rank, 5 batches of 4
    for r in range(WORLD):
        assert torch.load(out / f"r{r}.pt") == {"world_size": 2, "steps": 2}


def test_single_process_keeps_the_requested_gpu() -> None:
    """``--device cuda:1`` in one process is GPU 1 (it used to become the current device);
    under torchrun each rank takes its LOCAL_RANK; bare ``cuda`` is the current device."""
    from pathflow.train.distributed import pick_cuda_device

    assert pick_cuda_device(torch.device("cuda:1"), 1, 0, current=0) == torch.device("cuda", 1)
    assert pick_cuda_device(torch.device("cuda"), 1, 0, current=2) == torch.device("cuda", 2)
    assert pick_cuda_device(torch.device("cuda:1"), 4, 3, current=0) == torch.device("cuda", 3)
