"""An in-process rollout engine: batched sampling from a torch/HF causal LM with a KV cache.

No server, no extra package: the whole RL loop runs on a laptop CPU with a tiny model, and on one
GPU with a real one. It is the default engine of the examples and the reference the SGLang client
is checked against in spirit (same sampling parameters, same log-prob convention).

How a batch is decoded (``B`` rows, ``P`` the longest prompt, ``t`` the decode step):

1. Left-pad the rows' token lists (prompt plus any partial response) to ``P``; positions are
   ``cumsum(attention_mask) - 1`` so every row's first real token sits at position 0, exactly as
   in an unpadded forward (this is what makes the log-probs equal a teacher-forced pass).
2. Prefill all ``P`` tokens into an HF ``DynamicCache``; sample from the last logits.
3. Each step feeds the ``B`` sampled tokens with position ``last + 1``. Finished rows keep feeding
   the pad token (cheaper than re-packing the batch); their outputs are ignored.
4. Stop when every row hit a stop token or its budget, or when :meth:`EmbeddedEngine.abort` is set.

Sampling and the log-prob convention are in :mod:`rlkit.rollout.engines.sampling`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from rlkit.rollout.engines.base import SamplingParams, check_prompts, finish_status
from rlkit.rollout.engines.sampling import sample_next_token
from rlkit.rollout.sample import Sample, SampleStatus


class EmbeddedEngine:
    """Generate with a causal LM held in this process (implements ``RolloutEngine``).

    Args:
        model: an HF-style causal LM: ``model(input_ids=, attention_mask=, position_ids=,
            past_key_values=, use_cache=True)`` returning ``.logits`` ``[B, T, V]`` and
            ``.past_key_values``. Put it on the device and dtype you want before passing it in.
        tokenizer: optional; if given, ``Sample.response`` is ``tokenizer.decode(response_tokens,
            skip_special_tokens=True)``.
        pad_token_id: the id fed for padding and for finished rows (never sampled from).
        max_batch_size: rows decoded together; larger requests are split into consecutive chunks.
        show_progress: a tqdm bar over chunks (``tqdm`` is imported only then).
        static_cache: decode with :class:`~rlkit.rollout.engines.static_decode.StaticKVDecoder`
            (preallocated KV cache, SDPA attention) instead of HF's forward with a ``DynamicCache``.
            Qwen3/Qwen2/Llama-shaped models with default RoPE only.
        cuda_graph: with ``static_cache`` on a CUDA device, replay the decode step as a CUDA graph
            (batches are then padded to a power of two rows so that a few graphs serve all sizes).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tokenizer: Any | None = None,
        pad_token_id: int = 0,
        max_batch_size: int = 64,
        show_progress: bool = False,
        static_cache: bool = False,
        cuda_graph: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max_batch_size
        self.show_progress = show_progress
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self.num_generated_tokens = 0
        self._static = None
        if static_cache:
            from rlkit.rollout.engines.static_decode import StaticKVDecoder

            self._static = StaticKVDecoder(self.model, use_cuda_graph=cuda_graph)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter."""
        return next(self.model.parameters()).device

    # -- protocol ---------------------------------------------------------------------------------

    def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        """Fill in responses for ``samples`` (see ``RolloutEngine.generate``); returns the same objects."""
        check_prompts(samples)
        self._abort.clear()
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        chunks = [samples[i : i + self.max_batch_size] for i in range(0, len(samples), self.max_batch_size)]
        if self.show_progress and len(chunks) > 1:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="rollout", unit="batch")
        with self._lock, torch.inference_mode():
            for chunk in chunks:
                if self._abort.is_set():
                    for sample in chunk:
                        sample.status = SampleStatus.ABORTED
                    continue
                self._generate_chunk(chunk, params, generator)
        return samples

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy ``state_dict`` into the live parameters and buffers (names as in ``model.state_dict()``).

        Raises:
            KeyError: a name the model does not have (the error lists a few it does have).
            ValueError: a shape mismatch, naming the tensor and both shapes.
        """
        live = self.model.state_dict(keep_vars=True)
        # All shapes are checked before the first copy, so a bad state dict leaves the model as it was
        # instead of half old and half new weights.
        _check_against_live(state_dict, live)
        with self._lock, torch.no_grad():
            for name, tensor in state_dict.items():
                live[name].copy_(tensor, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def load_weight_buckets(self, buckets: Iterable[Mapping[str, torch.Tensor]]) -> int:
        """Copy a stream of weight buckets into the live parameters in place; returns the tensors copied.

        This is the colocated weight-sync path: the trainer yields bounded buckets of tensors on the same
        device (see ``rlkit.parallel.megatron.weight_sync``), each is copied with ``Tensor.copy_`` into the
        existing parameter (no re-allocation, dtype cast on the fly) and can be freed before the next one is
        made. Generation is locked out for the whole stream, so it never runs on half-updated weights. A tied
        head shares the embedding's storage, so the embedding alone updates both.

        Each bucket is checked before any of its tensors is copied; a bad bucket raises with the earlier
        buckets already loaded (a stream cannot be checked ahead), so retry the whole sync after fixing it.

        Raises:
            KeyError: a name the model does not have. ValueError: a shape mismatch naming the tensor.
        """
        live = self.model.state_dict(keep_vars=True)
        num_copied = 0
        written: dict[int, str] = {}  # storage -> the name that wrote it
        with self._lock, torch.no_grad():
            for bucket in buckets:
                _check_against_live(bucket, live)
                _check_not_aliased(bucket, live, written)
                # One multi-tensor launch per bucket instead of one per tensor (launches dominate on GPU).
                torch._foreach_copy_([live[name] for name in bucket], list(bucket.values()), non_blocking=True)
                num_copied += len(bucket)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return num_copied

    def abort(self) -> None:
        """Make the running (or next chunk of the running) ``generate`` return its rows ``ABORTED``."""
        self._abort.set()

    def health(self) -> bool:
        """Always true while the object exists: the model lives in this process."""
        return True

    # -- decoding ---------------------------------------------------------------------------------

    def _generate_chunk(self, chunk: list[Sample], params: SamplingParams, generator: torch.Generator | None) -> None:
        budgets = [params.max_new_tokens - s.response_length for s in chunk]
        active = [i for i, budget in enumerate(budgets) if budget > 0]
        for i, budget in enumerate(budgets):
            if budget <= 0:  # a resumed sample that already used its whole budget
                chunk[i].status = SampleStatus.TRUNCATED
        if not active:
            return
        rows = [chunk[i] for i in active]
        new_tokens, new_log_probs, hit_stop, aborted = self._decode(
            [s.tokens for s in rows], [budgets[i] for i in active], params, generator
        )
        for row, sample in enumerate(rows):
            sample.tokens = list(sample.tokens) + new_tokens[row]
            sample.response_length += len(new_tokens[row])
            sample.rollout_log_probs = list(sample.rollout_log_probs or []) + new_log_probs[row]
            if sample.loss_mask is not None:
                sample.loss_mask = list(sample.loss_mask) + [1] * len(new_tokens[row])
            sample.status = finish_status(
                hit_stop=hit_stop[row],
                response_length=sample.response_length,
                max_new_tokens=params.max_new_tokens,
                aborted=aborted and not hit_stop[row] and sample.response_length < params.max_new_tokens,
            )
            if self.tokenizer is not None:
                sample.response = self.tokenizer.decode(sample.response_tokens, skip_special_tokens=True)

    def _decode(
        self,
        token_lists: list[list[int]],
        budgets: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[list[list[int]], list[list[float]], list[bool], bool]:
        device = self.device
        num_rows, max_len = len(token_lists), max(len(t) for t in token_lists)
        input_ids = torch.full((num_rows, max_len), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((num_rows, max_len), dtype=torch.long, device=device)
        for row, tokens in enumerate(token_lists):
            input_ids[row, max_len - len(tokens) :] = torch.tensor(tokens, dtype=torch.long, device=device)
            attention_mask[row, max_len - len(tokens) :] = 1
        # Pads get position 0 (any value works: they are masked out), real tokens count from 0.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        budget_t = torch.tensor(budgets, device=device)
        stop_ids = torch.tensor(params.stop_token_ids or [-1], device=device)

        prefill, step = self._hf_steps(attention_mask, position_ids) if self._static is None else self._static_steps()
        logits = prefill(input_ids, attention_mask, max(budgets))
        done = torch.zeros(num_rows, dtype=torch.bool, device=device)
        hit_stop = torch.zeros(num_rows, dtype=torch.bool, device=device)
        steps_tokens, steps_log_probs, steps_valid = [], [], []
        aborted = False
        for step_index in range(max(budgets)):
            tokens, log_probs = sample_next_token(
                logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, generator=generator
            )
            valid = ~done
            steps_tokens.append(tokens)
            steps_log_probs.append(log_probs)
            steps_valid.append(valid)
            is_stop = torch.isin(tokens, stop_ids) & valid
            hit_stop |= is_stop
            done |= is_stop | (budget_t <= step_index + 1)
            # One host sync per step: cheap next to a forward, and it lets abort() and "all done" stop early.
            if bool(done.all()) or self._abort.is_set():
                aborted = not bool(done.all())
                break
            feed = torch.where(done, torch.full_like(tokens, self.pad_token_id), tokens)
            logits = step(feed)
        return _collect(steps_tokens, steps_log_probs, steps_valid, hit_stop, aborted, self)

    def _static_steps(self):
        return self._static.prefill, self._static.step

    def _hf_steps(self, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        state = {"mask": attention_mask, "positions": position_ids[:, -1], "cache": _new_cache(self.model)}

        def prefill(input_ids, mask, max_new_tokens):
            del max_new_tokens  # the dynamic cache grows as needed
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=state["cache"],
                use_cache=True,
            )
            state["cache"] = out.past_key_values
            return out.logits[:, -1]

        def step(tokens):
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=-1)
            state["positions"] = state["positions"] + 1
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=state["mask"],
                position_ids=state["positions"][:, None],
                past_key_values=state["cache"],
                use_cache=True,
            )
            state["cache"] = out.past_key_values
            return out.logits[:, -1]

        return prefill, step


def _check_against_live(state_dict: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> None:
    unknown = [name for name in state_dict if name not in live]
    if unknown:
        raise KeyError(f"update_weights: unknown parameter names {unknown[:5]}; the model has e.g. {list(live)[:5]}")
    for name, tensor in state_dict.items():
        if live[name].shape != tensor.shape:
            raise ValueError(
                f"update_weights: {name} has shape {tuple(tensor.shape)}, model expects {tuple(live[name].shape)}"
            )


def _check_not_aliased(
    bucket: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor], written: dict[int, str]
) -> None:
    # A tied engine (lm_head is embed_tokens) fed an untied model's two tensors would silently keep the last one.
    for name in bucket:
        pointer = live[name].data_ptr()
        if pointer in written:
            raise ValueError(
                f"load_weight_buckets: {name} and {written[pointer]} share storage in the engine (tied weights) but "
                "both were sent; build the engine with the trainer's tie_word_embeddings"
            )
        written[pointer] = name


def _new_cache(model: torch.nn.Module) -> Any:
    # A DynamicCache when transformers is the model's home; models with their own cache get None.
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return None
    return DynamicCache(config=getattr(model, "config", None))


def _collect(
    steps_tokens: list[torch.Tensor],
    steps_log_probs: list[torch.Tensor],
    steps_valid: list[torch.Tensor],
    hit_stop: torch.Tensor,
    aborted: bool,
    engine: EmbeddedEngine,
) -> tuple[list[list[int]], list[list[float]], list[bool], bool]:
    tokens = torch.stack(steps_tokens, dim=1).tolist()
    log_probs = torch.stack(steps_log_probs, dim=1).tolist()
    valid = torch.stack(steps_valid, dim=1).tolist()
    out_tokens, out_log_probs = [], []
    for row_tokens, row_log_probs, row_valid in zip(tokens, log_probs, valid, strict=True):
        keep = sum(row_valid)  # valid is a prefix of ones: a row never restarts once done
        out_tokens.append(row_tokens[:keep])
        out_log_probs.append(row_log_probs[:keep])
    engine.num_generated_tokens += sum(len(t) for t in out_tokens)
    return out_tokens, out_log_probs, hit_stop.tolist(), aborted


def from_pretrained(path: str, *, device: str = "cpu", dtype: str = "float32", **engine_kwargs: Any) -> EmbeddedEngine:
    """Load an HF checkpoint directory (model and tokenizer) into an engine; a ``ProcessEngine`` factory target.

    Args:
        path: a local HF model directory (``config.json``, safetensors, tokenizer files).
        device: where the model runs, e.g. ``"cuda:0"``.
        dtype: a ``torch`` dtype name, e.g. ``"bfloat16"``.
        **engine_kwargs: forwarded to :class:`EmbeddedEngine`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id or 0)
    return EmbeddedEngine(model, tokenizer=tokenizer, **engine_kwargs)


def tiny_engine(*, seed: int = 0, device: str = "cpu", **engine_kwargs: Any) -> EmbeddedEngine:
    """An engine over :func:`rlkit.models.tiny.build_tiny_qwen3` and the char tokenizer (tests, CPU demos)."""
    from rlkit.models.tiny import build_char_tokenizer, build_tiny_qwen3

    return EmbeddedEngine(build_tiny_qwen3(seed=seed).to(device), tokenizer=build_char_tokenizer(), **engine_kwargs)
