"""The classifier: weights cast once onto a device, uint8 batches in, top-k probabilities out.

The device is a parameter: the same code runs on the CPU and on CUDA, with the CUDA-only
knobs behind one check.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.backends.base import ModelSpec, embedding_head
from pipeline.errors import RunError, UsageError, notice
from pipeline.prediction import Prediction


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The run's device, resolved once; on CUDA always with its index (`cuda:N`).

    torch.cuda.set_device, streams and pinned copies take an indexed device only
    (`torch.device("cuda")` is refused by set_device), so `auto` and `cuda` become this
    process's GPU: the local rank's under torchrun, else the current one (device 0 of
    those CUDA_VISIBLE_DEVICES shows, which is the one Ray assigns an actor).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if local_rank is None else local_rank
    if index >= count:
        whose = f" (for local rank {local_rank})" if device.index is None else ""
        raise UsageError(f"--device {name}{whose}: this machine has {count} GPU(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 convolutions are fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    # a precision of a runtime's own (OpenVINO's INT8; the config checked that one offers
    # it): torch's side of it, normalisation and the reference it is checked against, fp32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)


class Labelling:
    """A batch on its way through the device. On CUDA, result() waits for its scores to
    arrive while the next batch is already sent; elsewhere they are there already."""

    def __init__(self, found: torch.Tensor | Prediction, done: torch.cuda.Event | None = None,
                 top_k: int = 0, inputs: torch.Tensor | None = None):
        self._found = found  # scores, class ids (and embeddings) in one host tensor
        self._done = done
        self._top_k = top_k
        self._inputs = inputs  # the host batch, kept until its copy to the device is done

    def result(self) -> Prediction:
        if isinstance(self._found, Prediction):
            return self._found
        if self._done is not None:
            self._done.synchronize()
        found, k = self._found.numpy(), self._top_k
        embeddings = np.ascontiguousarray(found[:, 2 * k:]) if found.shape[1] > 2 * k else None
        return Prediction(class_ids=found[:, k:2 * k].astype(np.int32),
                          scores=np.ascontiguousarray(found[:, :k]), embeddings=embeddings)


# Out of memory as cuDNN, cuBLAS and the CUDA runtime word it in a plain RuntimeError
# (torch raises torch.OutOfMemoryError only for its own caching allocator's failures).
_LIBRARY_OUT_OF_MEMORY = ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
                          "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUDA error: out of memory")


def use_cuda(device: torch.device, dtype: torch.dtype) -> None:
    """The process's CUDA knobs, for an indexed device: the current device (a pin thread,
    torch.compile and the side stream use it); cuDNN's kernel search for a fixed shape;
    TF32 only where the run is not in fp32 (fp32 asked means fp32, as on the CPU: TF32
    rounds the inputs of every convolution to 10 bits)."""
    if device.index is None:
        raise ValueError(f"use_cuda needs an indexed device, got {device}")
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    tf32 = dtype != torch.float32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


class Classifier:
    """Weights cast once onto the device; uint8 batches in, top-k probabilities out (numpy)."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, top_k: int,
                 embeddings: bool = False):
        if top_k > spec.num_classes:
            raise UsageError(f"--top-k {top_k} is more than the model's {spec.num_classes} classes")
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.top_k = top_k
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:  # the only CUDA-specific knobs; everything else is the same code
            use_cuda(device, dtype)
        net = spec.build().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self._features: list[torch.Tensor] = []
        self.embedding_size = None
        if embeddings:
            # The pooled penultimate features are the head's input: catch them on the way in,
            # from the same forward pass that gives the labels.
            head, self.embedding_size = embedding_head(net)
            head.register_forward_pre_hook(lambda _, inputs: self._features.append(inputs[0]))
        self.net = net  # what runs: the eager network, compiled, or another runtime's
        self.eager_net = net
        self.runtime = "torch"  # the registered runtime that runs it (runtimes/)
        self.own_kernels = False
        self.speed_key = None  # its speeds kept under torch eager's (use_network)
        self._input_dtype = dtype  # what the network is given
        self.fixed_batch: int | None = None  # every batch padded to this size (pad_batches_to)
        # CUDA: a batch is copied to the device on a stream of its own while the one before
        # computes; the stream waits for the copy, no more.
        self._copies = torch.cuda.Stream(device) if self.on_cuda else None
        mean = torch.tensor(spec.preprocess.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.preprocess.std, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the device. In fp16 (10-bit mantissa)
        # that is accurate and halves the memory traffic; bf16's 8 bits would round three
        # times, measurably worse against the reference, so there it is done in fp32.
        self._norm_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        self._scale = (1.0 / (255.0 * std)).to(self._norm_dtype)
        self._shift = (-mean / std).to(self._norm_dtype)
        self.fits: int | None = None  # the largest batch known to fit, once one did not

    def release(self) -> None:
        """Let go of the network and the device memory it holds: a driver that hands the
        labelling to others (Ray's) keeps none of a GPU its actors may be placed on."""
        self.net = self.eager_net = None
        self._copies = self._scale = self._shift = None
        if self.on_cuda:
            torch.cuda.empty_cache()  # what torch's caching allocator held, back to the GPU

    def pad_batches_to(self, size: int) -> None:
        """Every batch given the same shape: shorter ones (the last, those with error rows)
        are padded on the device and the padding's rows dropped. A compiled network then
        compiles once, and cuDNN's benchmark picks its kernels once, not for each new shape."""
        self.fixed_batch = size

    def use_network(self, net, runtime: str, own_kernels: bool = False,
                    speed_key: str | None = None) -> None:
        """Run `net` (a runtime's form of the eager network) from now on. A runtime with
        kernels of its own is given fp32 (its own precision is its own). `speed_key`: its
        measured speeds are kept apart from torch eager's under it (tuning.py); None
        shares them (torch's own runtimes)."""
        self.net, self.runtime, self.own_kernels = net, runtime, own_kernels
        self.speed_key = speed_key
        self._input_dtype = torch.float32 if own_kernels else self.dtype

    def predict(self, images: torch.Tensor) -> Prediction:
        """Top-k of a uint8 batch, waited for."""
        return self.submit(images).result()

    def submit(self, images: torch.Tensor) -> Labelling:
        """Top-k of a uint8 batch, on its way. A batch the device has no memory for goes in
        halves.

        A model or input size that the default batch does not fit on a small card then
        still runs, at the largest batch that fits.
        """
        if self.fits is not None and len(images) > self.fits:
            return Labelling(Prediction.join([self.predict(part)
                                              for part in images.split(self.fits)]))
        try:
            return self._forward(images)
        except torch.cuda.OutOfMemoryError:  # what any device raises (torch.OutOfMemoryError)
            pass  # handled below, once the failed attempt's tensors are let go
        except RuntimeError as exc:
            # cuDNN and cuBLAS report their own allocation failures as plain RuntimeErrors
            if not any(word in str(exc) for word in _LIBRARY_OUT_OF_MEMORY):
                raise
        if self.on_cuda:
            torch.cuda.empty_cache()
        if len(images) == 1:
            raise RunError(f"{self.device} ran out of memory for a single image: "
                           f"{self.spec.model} at {self.spec.preprocess.size[1]}x"
                           f"{self.spec.preprocess.size[0]} does not fit in it")
        self.fits = len(images) // 2
        if self.fixed_batch is not None:
            self.fixed_batch = self.fits  # a new shape once, not a padded one that fails
        notice(f"{self.device} ran out of memory with batches of {len(images)}: going on "
               f"with {self.fits}; --batch-size {self.fits} starts there")
        return self.submit(images)

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> Labelling:
        count = len(images)
        x = self._to_device(images)
        if self.fixed_batch is not None and count < self.fixed_batch:
            x = torch.cat([x, x.new_zeros((self.fixed_batch - count, *x.shape[1:]))])
        x = self.network_input(x)
        self._features.clear()
        probs = self.net(x)[:count].float().softmax(dim=1)
        scores, ids = probs.topk(self.top_k, dim=1)
        # One copy back from the device, not two or three: class ids are exact in float32.
        found = [scores, ids.float()]
        if self.embedding_size is not None:
            found.append(self._features[-1][:count].float())
        return self._to_host(torch.cat(found, dim=1), images)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch on the device as the network reads it: colour order, normalised,
        its dtype and layout (what a runtime calibrates on, too)."""
        preprocess = self.spec.preprocess
        if preprocess.channels == "BGR":
            x = x.flip(1)  # the crops are RGB; mean and std are in the model's order
        x = torch.addcmul(self._shift, x.to(self._norm_dtype), self._scale)
        # The loader's batches arrive channels_last already (then this copies nothing);
        # other callers' planar ones are converted here.
        x = x.to(self._input_dtype).contiguous(memory_format=torch.channels_last)
        if preprocess.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)  # channels_last in memory: a view, nothing copied
        return x

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if not self.on_cuda:
            return images.to(self.device)
        with torch.cuda.stream(self._copies):  # beside the batch before, still computing
            x = images.to(self.device, non_blocking=True)
        torch.cuda.current_stream().wait_stream(self._copies)
        x.record_stream(torch.cuda.current_stream())  # its memory is the compute's to free
        return x

    def _to_host(self, found: torch.Tensor, images: torch.Tensor) -> Labelling:
        if not self.on_cuda:
            return Labelling(found, top_k=self.top_k)
        host = torch.empty(found.shape, dtype=found.dtype, pin_memory=True)
        host.copy_(found, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Labelling(host, done, self.top_k, inputs=images)
