"""Communicator on 2 gloo processes (127.0.0.1, 1 thread each), each run bounded by a watchdog."""
from conftest import run_ranks

TIMEOUT = 90

_WORKER = r'''
import datetime, sys, torch
import torch.distributed as dist
torch.set_num_threads(1)
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=30))
from mini_unlearn.distributed import communicator, DistributedError
comm = communicator(timeout=30)
assert comm is not None and (comm.rank, comm.world) == (rank, world)
# slices tile, sums, slice of a sum
g = torch.Generator().manual_seed(0)
vecs = [torch.randn(11, generator=g, dtype=torch.float64) for _ in range(world)]
lo, hi = comm.slice(11)
assert torch.equal(comm.sum_slice(vecs[rank]), (vecs[0] + vecs[1])[lo:hi])
t = vecs[rank].clone(); comm.sum_(t); assert torch.equal(t, vecs[0] + vecs[1])
idx = comm.indices(7); assert idx.tolist() == list(range(rank, 7, world))
X, y = torch.arange(14.).view(7, 2), torch.arange(7)
Xs, ys = comm.shard_data((X, y)); assert torch.equal(ys, idx) and torch.equal(Xs, X[idx])
own = comm.owners([8.0, 1.0, 27.0]); assert own == [1, 1, 0], own
x = torch.full((3,), float(rank)); comm.from_owner(x, 1); assert torch.equal(x, torch.ones(3))
# one rank fails: every rank raises the same typed error
try:
    comm.run(lambda: (_ for _ in ()).throw(ValueError("boom")) if rank == 1 else 5)
except DistributedError as e:
    assert e.failed == [1], e.failed
    assert (e.cause is not None) == (rank == 1)
else:
    raise AssertionError("no error")
assert comm.run(lambda: rank) == rank
# Recorder(ddp_model) covers the inner module's names; gradients after DDP's all-reduce agree
from torch.nn.parallel import DistributedDataParallel as DDP
from mini_unlearn import Recorder
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
ddp = DDP(net)
rec = Recorder(ddp, checkpoints=2, total_steps=2)
assert rec.layout.names == Recorder(net).layout.names == [n for n, _ in net.named_parameters()]
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
rec.attach(opt)
xb = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
for _ in range(2):
    opt.zero_grad(); ddp(xb).pow(2).mean().backward(); opt.step()
assert rec.steps == 2
w = torch.cat([p.detach().flatten() for p in net.parameters()]); w0 = w.clone(); comm.from_owner(w0, 0)
assert torch.equal(w, w0)  # same model on every rank
del ddp, rec, opt
dist.barrier()
print("ok", rank, flush=True)
dist.destroy_process_group()
'''


def test_single_process_has_no_communicator():
    from mini_unlearn.distributed import communicator
    assert communicator() is None


def test_communicator_two_gloo_ranks():
    run_ranks(_WORKER, 2, timeout=TIMEOUT)
