"""torch eager: the network as the backend built it, on the classifier's device and dtype."""

from __future__ import annotations

from pipeline.runtimes.base import Expected, Preparing, Runtime


class Eager(Runtime):
    name = "torch"

    def prepare(self, classifier, preparing: Preparing = Preparing()) -> dict:
        classifier.use_network(classifier.eager_net, self.name)
        return {}

    def not_weighed(self, measure) -> str | None:
        return None  # what every other runtime is weighed against

    def expected(self, classifier, measure) -> Expected:
        # measured first, while the classifier still runs the network as built
        return Expected(measure.speed(self.name).images_per_second() or 0.0)


RUNTIME = Eager()
