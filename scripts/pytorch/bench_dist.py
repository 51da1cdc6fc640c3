"""Distributed training throughput of the PyTorch twin under DistributedDataParallel, measured
as axial's `cargo bench -p axial-worker --bench train_dist` measures its own: `--world N`
processes (torch.multiprocessing, Gloo on loopback; NCCL with --device cuda), `--threads` each,
`--batch` random images per process, the step forward, cross-entropy, backward (DDP's bucketed
gradient all-reduce overlapped with it) and SGD (momentum 0.9, Nesterov, weight decay 8e-5,
`foreach=True`); 5 warm-up steps, then the median over the steps of the slowest rank.
`--world 1` is one process without DDP (the scaling baseline).

  python scripts/pytorch/bench_dist.py --size 32 [--world 2] [--threads 1] [--batch 8]
      [--iters 30] [--warmup 5] [--arch axial26s] [--foreach 1] [--sync-bn none|attention]
      [--device cpu|cuda]

`--sync-bn attention`: the attention layers' batch norms as `torch.nn.SyncBatchNorm` (which
refuses CPU tensors: CUDA only, as PyTorch users get it). Prints one JSON line (rank 0):
size, world, threads, batch, images_per_s, step_ms.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from axial_twin import AxialAttention, AxialAttentionNet, ModelConfig, init_like_rust  # noqa: E402


def sync_attention_norms(net):
    """The attention layers' batch norms as SyncBatchNorm (the rest stay local)."""
    for layer in net.modules():
        if isinstance(layer, AxialAttention):
            for name, child in list(layer.named_children()):
                if isinstance(child, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                    setattr(layer, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return net


def run(rank, a, port, out):
    torch.set_num_threads(a.threads)
    device = torch.device("cuda", rank) if a.device == "cuda" else torch.device("cpu")
    if a.world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=rank,
                                world_size=a.world)
    cfg = ModelConfig.from_table({"arch": a.arch, "num_classes": 10}, image_size=a.size)
    net = AxialAttentionNet(cfg)
    init_like_rust(net, seed=0)
    if a.sync_bn == "attention":
        net = sync_attention_norms(net)
    net = net.to(device)
    model = net
    if a.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=8e-5, foreach=bool(a.foreach))
    torch.manual_seed(100 + rank)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    y = torch.randint(0, 10, (a.batch,), device=device)
    model.train()
    times = []
    for i in range(a.warmup + a.iters):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        each = torch.zeros(a.world, dtype=torch.float64)
        each[rank] = time.perf_counter() - t
        if a.world > 1:
            each = each.to(device)
            dist.all_reduce(each)
        if i >= a.warmup:
            times.append(each.max().item())
    if rank == 0:
        step = statistics.median(times)
        out.put({"size": a.size, "world": a.world, "threads": a.threads, "batch": a.batch,
                 "sync_bn": a.sync_bn, "foreach": a.foreach,
                 "images_per_s": a.world * a.batch / step, "step_ms": step * 1e3})
    if a.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="axial26s")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--foreach", type=int, default=1)
    p.add_argument("--sync-bn", choices=["none", "attention"], default="none")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.sync_bn != "none" and a.device != "cuda":
        sys.exit("bench_dist.py: SyncBatchNorm refuses CPU tensors (PyTorch); --sync-bn "
                 "attention needs --device cuda")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    if a.world == 1:
        run(0, a, port, out)
    else:
        mp.start_processes(run, args=(a, port, out), nprocs=a.world, start_method="spawn")
    print(json.dumps(out.get()))


if __name__ == "__main__":
    main()
