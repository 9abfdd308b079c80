"""torch.compile (inductor, weights frozen) for one batch shape; settings measures whether
compiling repays its time (tuning keeps what it cost and gave)."""

from __future__ import annotations

from pipeline.errors import RunError
from pipeline.runtimes.base import Preparing, Runtime


class Compiled(Runtime):
    name = "compile"

    def prepare(self, classifier, preparing: Preparing = Preparing()) -> dict:
        """Compile the classifier's network for one batch shape (every batch padded to it),
        so one compile serves the whole run. Compiled already (to be measured): the batch
        shape only."""
        size = preparing.batch_size or classifier.fixed_batch or 1
        if classifier.runtime != self.name:
            classifier.use_network(CompiledNetwork(classifier.eager_net, classifier.spec.model),
                                   self.name)
        classifier.pad_batches_to(size)
        return {}


class CompiledNetwork:
    """torch.compile of the eager network, watched: a shape that dynamo would not compile
    any more (it gave up on the forward) is an error, not a silently eager 'compiled' run."""

    def __init__(self, eager_net, model: str):
        import torch
        import torch._inductor.config as inductor

        # Freezing treats the weights as constants: batch norm folded into the convolutions
        # and, on CPU, oneDNN's prepacked weights. ResNet-50 bf16 on 2 EPYC cores: 1.45x
        # the best eager batch with it, 1.2x without (docs/benchmarks.md). Inference only,
        # which is all this process does.
        inductor.freezing = True
        # dynamic=False: each batch size tried (tuning.measure_batch_size, compiled) gets a
        # graph of its own; by default a second size would make the batch dimension
        # symbolic, and the run's one shape would get slower, general kernels.
        self.net = torch.compile(eager_net, dynamic=False)
        self.model = model
        self.shapes: set = set()

    def __call__(self, x):
        if x.shape in self.shapes:
            return self.net(x)
        # A new shape: dynamo traces it, unless it has given up on the model's forward
        # (after 8 graphs of one code object in a process, from any instance, freed ones
        # too), when it runs it eagerly without a word. A "compiled" run would then measure
        # eager, and record that compiling does not pay here.
        from torch._dynamo.utils import counters

        traced = counters["stats"]["unique_graphs"]
        out = self.net(x)
        if counters["stats"]["unique_graphs"] == traced:
            raise RunError(
                f"torch.compile ran {self.model} uncompiled at batch {len(x)}: this "
                "process has compiled its forward too often (torch._dynamo.config."
                "recompile_limit); run it in a new process or call torch._dynamo.reset()")
        self.shapes.add(x.shape)
        return out


RUNTIME = Compiled()
