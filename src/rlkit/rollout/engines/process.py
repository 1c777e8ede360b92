"""Run any rollout engine in its own process, behind the same ``RolloutEngine`` protocol.

Why: in slime's decoupled and async modes, generation runs on its own GPUs while training goes on.
Here the child process owns the engine (e.g. an :class:`EmbeddedEngine` on ``cuda:1``) and the
parent talks to it over a pipe:

- the engine is built *in the child* from a picklable factory, ``"module:function"`` plus keyword
  arguments, so no model or CUDA context ever crosses the process boundary;
- ``generate`` ships samples as plain dicts (``Sample.to_dict``) and copies the results back into
  the caller's ``Sample`` objects;
- ``update_weights`` sends the tensors through ``torch.multiprocessing``, which moves CPU tensors
  into shared memory (and CUDA tensors through CUDA IPC) instead of pickling their bytes;
- ``abort`` sets a shared event that a watcher thread in the child turns into ``engine.abort()``,
  so it works while the pipe is busy with a ``generate``;
- an exception in the child comes back re-raised in the parent, chained to the child's traceback;
  a dead child makes ``health()`` false and any pending call raise :class:`ProcessEngineError`.

The child is started with the ``spawn`` method (``fork`` is unsafe with CUDA and with threads).

Weights by broadcast (the decoupled weight sync, after SGLang's ``init_weights_update_group`` /
``update_weights_from_distributed`` that slime drives): :meth:`ProcessEngine.init_weight_group` makes a
two-member process group (NCCL on GPU, gloo on CPU; rank 0 the trainer, rank 1 the engine), built from a
``TCPStore`` as a standalone backend object, so it touches neither side's default group. Then
:meth:`ProcessEngine.update_weights_by_broadcast` streams buckets over it with the protocol of
:func:`broadcast_buckets` / :func:`receive_buckets`; the pipe only starts the receiver and returns its result.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import pickle
import socket
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlkit.plugins import load_callable
from rlkit.rollout.engines.base import SamplingParams
from rlkit.rollout.sample import Sample


class ProcessEngineError(RuntimeError):
    """The engine process failed to start, died, or raised (the child's traceback is in the message)."""


def resolve_factory(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the callable.

    Only the explicit ``:`` spelling is accepted (the factory runs in another process, where a
    mistaken guess about which dot separates module and attribute would be harder to debug);
    the import itself is :func:`rlkit.plugins.load_callable`.

    Raises:
        ValueError: ``path`` is not of the form ``module:function``, the module does not import, or it
            names no callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory={path!r} must look like 'package.module:function'")
    return load_callable(path)


# -- weights by broadcast ---------------------------------------------------------------------------------

_END, _ABORT = 0, -1  # header values of the two control messages


class WeightGroupError(RuntimeError):
    """The weight broadcast group failed: a peer did not join or answer in time, or the sender aborted."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for the weight group's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def new_weight_group(
    *, host: str, port: int, rank: int, world_size: int = 2, backend: str = "gloo", timeout_s: float = 300
) -> Any:
    """A standalone process group (rank 0 hosts the ``TCPStore``) for broadcasting weights.

    Args:
        host, port: the store's address (rank 0 listens there).
        rank: 0 for the sender (the trainer), ``1..world_size-1`` for engine processes.
        world_size: members of the group.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors; set the CUDA device first).
        timeout_s: how long joining, and every broadcast, may wait for the other members.

    Raises:
        WeightGroupError: the other members did not join within ``timeout_s``.
        ValueError: an unknown backend.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            return dist.ProcessGroupGloo(store, rank, world_size, options)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(store, rank, world_size, options)
    except (RuntimeError, dist.DistStoreError) as err:
        raise WeightGroupError(
            f"weight group {host}:{port} (rank {rank} of {world_size}, {backend}) could not form within "
            f"{timeout_s} s: {err}"
        ) from err
    raise ValueError(f"backend={backend!r} must be 'gloo' or 'nccl'")


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _send_header(group: Any, meta_len: int, num_bytes: int, device: torch.device) -> None:
    _broadcast(group, torch.tensor([meta_len, num_bytes], dtype=torch.int64, device=device))


def broadcast_buckets(group: Any, buckets: Iterable[Mapping[str, torch.Tensor]], *, device: torch.device | str) -> int:
    """Send buckets from rank 0 of ``group``; returns the tensors sent.

    Protocol, per bucket: a header ``int64 [meta_len, num_bytes]``; ``meta_len`` bytes of UTF-8 JSON
    ``[[name, dtype, shape], ...]``; one flat ``uint8`` buffer of ``num_bytes`` holding the tensors' bytes
    back to back, in the order of the metadata. The stream ends with the header ``[0, 0]``; a sender that
    fails while producing a bucket sends ``[-1, 0]`` (the receivers raise) and re-raises its error.
    All messages live on ``device`` (CUDA for NCCL).
    """
    device = torch.device(device)
    num_sent = 0
    try:
        for bucket in buckets:
            tensors = [t.detach().to(device).contiguous() for t in bucket.values()]
            names = list(bucket)
            meta = [
                [name, str(t.dtype).removeprefix("torch."), list(t.shape)]
                for name, t in zip(names, tensors, strict=True)
            ]
            meta_bytes = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8).to(device)
            flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
            _send_header(group, meta_bytes.numel(), flat.numel(), device)
            _broadcast(group, meta_bytes)
            _broadcast(group, flat)
            num_sent += len(tensors)
    except BaseException:
        _send_header(group, _ABORT, 0, device)
        raise
    _send_header(group, _END, 0, device)
    return num_sent


def receive_buckets(group: Any, *, device: torch.device | str) -> Iterator[dict[str, torch.Tensor]]:
    """Receive the buckets of :func:`broadcast_buckets` (on a rank > 0); each is ``{name: tensor}`` on ``device``.

    The tensors of a bucket are views into one received buffer.

    Raises:
        WeightGroupError: the sender aborted, or a message did not arrive within the group's timeout.
    """
    device = torch.device(device)
    while True:
        header = torch.empty(2, dtype=torch.int64, device=device)
        _receive(group, header)
        meta_len, num_bytes = header.tolist()
        if meta_len == _END:
            return
        if meta_len == _ABORT:
            raise WeightGroupError("the weight sender aborted the stream (its own error is raised on its side)")
        meta_bytes = torch.empty(meta_len, dtype=torch.uint8, device=device)
        _receive(group, meta_bytes)
        meta = json.loads(bytes(meta_bytes.cpu().tolist()).decode())
        flat = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        _receive(group, flat)
        bucket, offset = {}, 0
        for name, dtype, shape in meta:
            dtype = getattr(torch, dtype)
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            bucket[name] = flat[offset : offset + size].view(dtype).view(shape)
            offset += size
        yield bucket


def _receive(group: Any, tensor: torch.Tensor) -> None:
    try:
        _broadcast(group, tensor)
    except RuntimeError as err:
        raise WeightGroupError(f"weight broadcast failed or timed out while receiving: {err}") from err


def load_received_buckets(engine: Any, group: Any, *, device: torch.device | str) -> int:
    """Receive a bucket stream into ``engine``; returns the tensors loaded.

    Uses ``engine.load_weight_buckets`` when the engine has it, else ``engine.update_weights`` per bucket. If
    loading fails (a name or shape the engine does not have), the rest of the stream is still received and
    dropped, so the sender finishes and the group stays usable; then the loading error is raised.
    """
    stream = receive_buckets(group, device=device)
    try:
        if hasattr(engine, "load_weight_buckets"):
            return engine.load_weight_buckets(stream)
        num_loaded = 0
        for bucket in stream:
            engine.update_weights(bucket)
            num_loaded += len(bucket)
        return num_loaded
    except WeightGroupError:
        raise
    except BaseException:
        for _ in stream:  # drain: the sender is still broadcasting
            pass
        raise


def _abort_watcher(engine, abort_event, stop: threading.Event) -> None:
    while not stop.is_set():
        if abort_event.wait(timeout=0.05):
            abort_event.clear()
            engine.abort()


def _pack_error(err: BaseException) -> tuple[BaseException | None, str]:
    text = "".join(traceback.format_exception(err))
    try:
        pickle.dumps(err)
        return err, text
    except Exception:  # an exception holding unpicklable state: send its text only
        return None, text


def _serve(conn, factory: str, factory_kwargs: dict[str, Any], abort_event) -> None:
    try:
        engine = resolve_factory(factory)(**factory_kwargs)
    except BaseException as err:
        conn.send(("error", _pack_error(err)))
        return
    conn.send(("ok", None))
    weight_group: dict[str, Any] = {}
    stop = threading.Event()
    threading.Thread(target=_abort_watcher, args=(engine, abort_event, stop), daemon=True).start()
    try:
        while True:
            method, args = conn.recv()
            if method == "close":
                conn.send(("ok", None))
                return
            try:
                if method == "generate":
                    samples = [Sample.from_dict(d) for d in args[0]]
                    result = [s.to_dict() for s in engine.generate(samples, args[1])]
                elif method == "update_weights":
                    result = engine.update_weights(args[0])
                elif method == "health":
                    result = bool(engine.health())
                elif method == "init_weight_group":
                    host, port, backend, device, timeout_s = args
                    if backend == "nccl":
                        torch.cuda.set_device(torch.device(device))
                    group = new_weight_group(host=host, port=port, rank=1, backend=backend, timeout_s=timeout_s)
                    weight_group.update(group=group, device=device)
                    result = None
                elif method == "receive_weights":
                    if not weight_group:
                        raise WeightGroupError("receive_weights before init_weight_group")
                    result = load_received_buckets(engine, weight_group["group"], device=weight_group["device"])
                else:
                    raise ValueError(f"unknown method {method!r}")
            except BaseException as err:
                conn.send(("error", _pack_error(err)))
            else:
                conn.send(("ok", result))
    except (EOFError, KeyboardInterrupt):  # parent went away
        return
    finally:
        stop.set()


class ProcessEngine:
    """A ``RolloutEngine`` living in a child process (use as a context manager, or call :meth:`close`).

    Args:
        factory: ``"module:function"`` returning the engine, e.g.
            ``"rlkit.rollout.engines.embedded:from_pretrained"``.
        factory_kwargs: keyword arguments for the factory (must be picklable).
        start_timeout_s: how long the child may take to build its engine.
    """

    def __init__(self, factory: str, factory_kwargs: dict[str, Any] | None = None, *, start_timeout_s: float = 300):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._abort_event = ctx.Event()
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Replies still owed by the child for calls that timed out in the parent; they arrive in order
        # before the reply to the next call and are dropped, so the pipe never answers the wrong call.
        self._num_stale_replies = 0
        self._weight_group: Any = None
        self._weight_device = torch.device("cpu")
        self.process = ctx.Process(
            target=_serve, args=(child_conn, factory, dict(factory_kwargs or {}), self._abort_event), daemon=True
        )
        self.process.start()
        child_conn.close()
        try:
            self._receive(timeout_s=start_timeout_s, what=f"starting {factory}")
        except BaseException:
            self.close()
            raise

    # -- protocol ---------------------------------------------------------------------------------

    def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        """Generate in the child; the results are copied into ``samples`` (the same objects are returned)."""
        done = self._call("generate", ([s.to_dict() for s in samples], params))
        for sample, data in zip(samples, done, strict=True):
            filled = Sample.from_dict(data)
            for name in ("tokens", "response", "response_length", "loss_mask", "rollout_log_probs", "status"):
                setattr(sample, name, getattr(filled, name))
        return samples

    def generate_async(self, samples: list[Sample], params: SamplingParams) -> concurrent.futures.Future:
        """:meth:`generate` on a background thread; the future resolves to ``samples``."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        return self._executor.submit(self.generate, samples, params)

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Send tensors to the child (shared memory / CUDA IPC) and copy them into its engine."""
        self._call("update_weights", ({k: v.detach() for k, v in state_dict.items()},))

    def init_weight_group(
        self,
        *,
        backend: str = "gloo",
        device: torch.device | str = "cpu",
        engine_device: torch.device | str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        timeout_s: float = 300,
    ) -> None:
        """Join this process (rank 0, the sender) and the engine process (rank 1) in a weight broadcast group.

        Args:
            backend: ``"nccl"`` between GPUs, ``"gloo"`` on CPU.
            device: where this side's messages live (this process's GPU for NCCL).
            engine_device: where the engine receives (default ``device``); its GPU for NCCL.
            host, port: the group's store address (default a free port on this host).
            timeout_s: how long joining and every broadcast may wait.

        Raises:
            WeightGroupError: the group did not form in time.
        """
        port = port or free_port(host)
        engine_device = str(engine_device or device)
        with self._lock:
            self._conn.send(("init_weight_group", (host, port, backend, engine_device, timeout_s)))
            try:
                group = new_weight_group(host=host, port=port, rank=0, backend=backend, timeout_s=timeout_s)
            finally:
                self._receive(timeout_s=timeout_s + 30, what="init_weight_group")
        self._weight_group, self._weight_device = group, torch.device(device)

    def update_weights_by_broadcast(
        self, buckets: Iterable[Mapping[str, torch.Tensor]], *, timeout_s: float | None = None
    ) -> int:
        """Broadcast weight buckets to the engine process, which loads each as it arrives; returns the count.

        Needs :meth:`init_weight_group` first. Errors in the engine (an unknown name, a shape mismatch naming
        the tensor) are raised here after the stream ends; the group stays usable.
        """
        if getattr(self, "_weight_group", None) is None:
            raise ProcessEngineError("update_weights_by_broadcast needs init_weight_group() first")
        with self._lock:
            if not self.process.is_alive():
                raise ProcessEngineError(
                    f"engine process exited (code {self.process.exitcode}) before receiving weights"
                )
            self._conn.send(("receive_weights", ()))
            try:
                broadcast_buckets(self._weight_group, buckets, device=self._weight_device)
            except BaseException:
                try:  # the engine raised on the abort header; collect that reply so the pipe stays in step
                    self._receive(timeout_s=timeout_s or 60, what="receive_weights")
                except Exception:
                    pass
                raise
            return self._receive(timeout_s=timeout_s, what="receive_weights")

    def abort(self) -> None:
        """Ask the child's engine to abort its running ``generate`` (works while the pipe is busy)."""
        self._abort_event.set()

    def health(self, *, timeout_s: float = 30) -> bool:
        """False once the child has exited or does not answer within ``timeout_s``.

        Otherwise the child engine's own ``health()`` (if the pipe is free; while a call is in flight
        the child is serving, which counts as healthy).
        """
        if not self.process.is_alive():
            return False
        if not self._lock.acquire(blocking=False):
            return True  # a call is in flight, so the child is serving
        try:
            self._conn.send(("health", ()))
            return bool(self._receive(timeout_s=timeout_s, what="health"))
        except ProcessEngineError:
            if self.process.is_alive():  # timed out: its answer is still on the way
                self._num_stale_replies += 1
            return False
        finally:
            self._lock.release()

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self, timeout_s: float = 10) -> None:
        """Stop the child: a polite ``close`` message, then terminate if it does not exit in time."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.process.is_alive():
            try:
                with self._lock:
                    self._conn.send(("close", ()))
                    self._receive(timeout_s=timeout_s, what="close")
            except (ProcessEngineError, OSError, BrokenPipeError):
                pass
            self.process.join(timeout=timeout_s)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=timeout_s)
        self._conn.close()

    def __enter__(self) -> ProcessEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pipe -------------------------------------------------------------------------------------

    def _call(self, method: str, args: tuple) -> Any:
        with self._lock:
            if not self.process.is_alive():
                raise ProcessEngineError(f"engine process exited (code {self.process.exitcode}) before {method}")
            self._conn.send((method, args))
            return self._receive(timeout_s=None, what=method)

    def _receive(self, *, timeout_s: float | None, what: str) -> Any:
        while self._num_stale_replies:
            self._receive_message(timeout_s=timeout_s, what=what)  # a timed-out call's late answer, even an error
            self._num_stale_replies -= 1
        status, payload = self._receive_message(timeout_s=timeout_s, what=what)
        if status == "ok":
            return payload
        err, text = payload
        if err is None:
            raise ProcessEngineError(f"{what} failed in the engine process:\n{text}")
        raise err from ProcessEngineError(f"raised in the engine process during {what}:\n{text}")

    def _receive_message(self, *, timeout_s: float | None, what: str) -> tuple[str, Any]:
        waited = 0.0
        while not self._conn.poll(0.1):
            waited += 0.1
            if not self.process.is_alive() and not self._conn.poll(0):
                raise ProcessEngineError(f"engine process died during {what} (exit code {self.process.exitcode})")
            if timeout_s is not None and waited >= timeout_s:
                raise ProcessEngineError(f"engine process did not answer {what} within {timeout_s} s")
        try:
            return self._conn.recv()
        except EOFError as err:
            raise ProcessEngineError(f"engine process closed the pipe during {what}") from err
