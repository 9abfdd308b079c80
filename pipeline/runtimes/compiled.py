"""torch.compile (inductor, weights frozen) for one batch shape: what compiling costs and
gives (tuning.py keeps it per machine) weighed by `auto` like any runtime's."""

from __future__ import annotations

from pipeline.errors import RunError
from pipeline.runtimes.base import Expected, Preparing, Runtime
from pipeline.runtimes.eager import RUNTIME as _EAGER

EAGER = _EAGER.name  # what compiling is weighed against

# Below this many images to label, compiling cannot pay on any machine we know: it takes
# 20-30 s and saves a third of the model's time. Not weighed, then.
MIN_IMAGES_TO_COMPILE = 1000


class Compiled(Runtime):
    name = "compile"
    one_shape = True

    def not_weighed(self, measure) -> str | None:
        if measure.pending < MIN_IMAGES_TO_COMPILE:
            return (f"{measure.pending} images to label, fewer than the "
                    f"{MIN_IMAGES_TO_COMPILE} a compile can repay")
        return None

    def expected(self, classifier, measure) -> Expected:
        """torch eager's rate times the speedup compiling gave on this machine last time
        (else our prior), for the compile's seconds: compiling only to weigh it would
        cost what is weighed. The first compile here also tries the sizes around the eager
        best, each a compile of its own; later runs know the best and compile once."""
        from pipeline import tuning  # loads torch: the registry's import does not

        eager = measure.speed(EAGER)
        figures = tuning.compile_figures(classifier, eager.batch_size)
        sizes = self._sizes(measure, eager)
        compiles = 1 if not sizes or tuning.compiled_batch_known(classifier, sizes) else len(sizes)
        return Expected((eager.images_per_second() or 0.0) * figures["speedup"],
                        compiles * figures["compile_seconds"], figures["from"])

    def take(self, classifier, measure, preparing: Preparing):
        """Compiled at the eager best batch, then (unless the batch was given) measured at
        it and its neighbours, each a compile of its own: the run's batch the fastest."""
        from pipeline import tuning  # loads torch: the registry's import does not

        eager = measure.speed(EAGER)
        eager.images_per_second()  # measured before compiling: what the compile is held to
        sizes = self._sizes(measure, eager)
        expected = tuning.compile_figures(classifier, eager.batch_size)["compile_seconds"]
        with measure.step(f"compiling {classifier.spec.model} with torch.compile (about "
                          f"{expected:.0f} s, once: the kernels are cached)"):
            tuning.use_inductor_cache(measure.cores)
            self.prepare(classifier, Preparing(batch_size=eager.batch_size))
            if not sizes:
                # The batch was given: the workers go by the eager rate, and the compiled
                # one is measured last, at the size the run ends up with (its first call
                # the compile).
                return tuning.Speed(classifier, eager.batch_size, eager.rate)
            compiled = tuning.measure_batch_size(classifier, sizes, compiled=True)
        measure.record["compiled_batch_sizes"] = compiled.to_dict()
        return tuning.Speed(classifier, compiled.batch_size,
                            compiled.rates.get(compiled.batch_size), compiled)

    def settled(self, classifier, measure, speed, batch_size: int) -> None:
        """What the compile cost and gave against the eager model, kept for the next run's
        weighing: as measured by `take` at this size, else measured now (its first call
        the compile)."""
        from pipeline import tuning  # loads torch: the registry's import does not

        eager = measure.speed(EAGER)
        compiled = speed.choice
        if compiled and compiled.first_call_seconds and batch_size in compiled.rates:
            figures = tuning.keep_compile_figures(classifier, eager.batch_size,
                                                  compiled.first_call_seconds,
                                                  compiled.rates[batch_size], eager.rate)
        else:
            figures = tuning.measure_compile(classifier, batch_size, eager.rate,
                                             eager.batch_size)
        measure.record["compiled"] = figures

    @staticmethod
    def _sizes(measure, eager) -> tuple[int, ...] | None:
        """Where a compiled model's best batch is looked for: around the eager best, unless
        the batch size was given (None)."""
        from pipeline import tuning  # loads torch: the registry's import does not

        if measure.batch_size is not None:
            return None
        return tuning.around(eager.batch_size, tuning.candidate_batches(measure.device))

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
