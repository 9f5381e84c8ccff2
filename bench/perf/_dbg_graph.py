import sys, traceback, importlib
sys.path.insert(0, "packages/kernels/tests")
import torch
import test_layer_graphs as t
from swiftune_kernels import apply_offloaded_checkpointing
lg = importlib.import_module("swiftune_kernels.layer_graphs")
orig = lg.LayerGraphs._capture
def cap(self, run, key, tensors):
    try:
        return orig(self, run, key, tensors)
    finally:
        if self.last_error: print("CAPTURE ERROR:", key[1][0] if isinstance(key[1], tuple) else "", self.last_error[:2000])
lg.LayerGraphs._capture = cap
# show the traceback of the first failure
real_graph = torch.cuda.graph
class G(real_graph):
    def __exit__(self, *exc):
        if exc[0] is not None:
            traceback.print_exception(*exc, limit=12)
        return super().__exit__(*exc)
torch.cuda.graph = G
dev = torch.device("cuda")
layers = t._stack(2, dev)
apply_offloaded_checkpointing(layers, policy="offload", cuda_graphs=True)
for i in range(4):
    x = torch.randn(2, 37, t.HIDDEN, device=dev); dy = torch.randn_like(x)
    t._step(layers, x, None, dy)
print([ (w.graphs.captures, w.graphs.replays, w.graphs.last_error) for w in t._wrappers(layers)])
