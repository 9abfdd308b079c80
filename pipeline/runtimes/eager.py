"""torch eager: the network as the backend built it, on the classifier's device and dtype."""

from __future__ import annotations

from pipeline.runtimes.base import Preparing, Runtime


class Eager(Runtime):
    name = "torch"

    def prepare(self, classifier, preparing: Preparing = Preparing()) -> dict:
        classifier.use_network(classifier.eager_net, self.name)
        return {}


RUNTIME = Eager()
