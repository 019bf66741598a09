"""The transformers backend: the base loaded with transformers, adapters attached with PEFT.

The generation engine holds the base once with every adapter attached, one active at a time. Its
models are timed as served after it closed, by `TransformersServer`: the base and every candidate
in one process, so their requests interleave.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.interface import (ADAPTER_SERVED_AS, BASE_SERVED_AS,
                                                   MERGED_SERVED_AS, Backend, Candidate,
                                                   Generation, MemoryProfile, Phase,
                                                   ServedRequest, decode, timed_phase)
from tunelens.settings import EvaluationSettings, GenerationSettings, TransformersSettings


def hf_sampling_options(settings: GenerationSettings, tokenizer) -> dict:
    """transformers `generate` options for `settings` (max_new_tokens, sampling, stop, padding)."""
    options = {"do_sample": False} if settings.greedy else {
        "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    if settings.stop:
        options.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
    options["pad_token_id"] = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                               else tokenizer.eos_token_id)
    return options


def torch_setup(options: TransformersSettings):
    """The torch device and dtype of `evaluation.transformers` ("auto" resolved)."""
    import torch

    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = options.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


class TransformersEngine:
    """The base loaded once with transformers; adapters attached with PEFT, one active at a time."""

    name = "transformers"

    def __init__(self, base_dir: Path, options: TransformersSettings):
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


def tensor_bytes(tensors) -> int:
    """Σ numel × element size over distinct tensors (a tied weight counts once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def merge_adapter(base_dir, adapter_dir, out_dir):
    """The base with the adapter folded in (PEFT merge_and_unload), saved in the base's dtype."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TunelensError(f"adapter {adapter_dir} cannot be merged into {base_dir}: "
                            f"{str(exc).splitlines()[0]}") from None
    merged.save_pretrained(out_dir)
    for item in Path(base_dir).iterdir():  # tokenizer and generation files, unchanged
        if item.is_file() and "token" in item.name or item.name == "generation_config.json":
            shutil.copy2(item, out_dir / item.name)
    return out_dir


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a transformers KV cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None),
                                                   getattr(layer, "values", None))]
    else:  # legacy tuple of (key, value) per layer
        tensors = [t for layer in cache for t in layer]
    return tensor_bytes(t for t in tensors if t is not None and hasattr(t, "numel"))


def adapter_parameter_names(model, label: str) -> list[str]:
    """PEFT parameter names of adapter `label`: `...<lora_A|lora_B|...>.<label>.<weight>`."""
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") and parts[i + 1] == label
               for i, part in enumerate(parts[:-1])):
            names.append(name)
    return names


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token comes out.

    generate() hands the streamer the prompt first, then each new token (moved to the CPU, so on
    a GPU the token is computed by then)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersServer:
    """The base and every candidate as served, in one process, so their requests interleave.

    The base is a plain transformers model. An adapter candidate is a PEFT model on a copy of the
    base's module tree that shares the base's weight tensors (no second copy of the weights); a
    merged candidate is its own model with the adapter folded in (one copy of the weights each).
    """

    backend = "transformers"

    def __init__(self, base_dir, candidates: list, options: TransformersSettings, served: str):
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.device, dtype = torch_setup(options)
        try:
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(self.device)
        except (OSError, ValueError) as exc:
            raise TunelensError(f"cannot load {base_dir}: {str(exc).splitlines()[0]}") from None
        base.eval()
        self.base_label = base_label = next(c.label for c in candidates if c.adapter_dir is None)
        self.weights_bytes = {base_label: tensor_bytes([*base.parameters(), *base.buffers()])}
        self.adapter_bytes: dict[str, int] = {base_label: 0}
        self.models = {base_label: base}
        self.served_as = {base_label: BASE_SERVED_AS}
        adapters = [c for c in candidates if c.adapter_dir is not None]
        if adapters and served == "adapter":
            self._serve_adapters(base, adapters)
        elif adapters:
            self._serve_merged(base, adapters)
        self.peak_allocated: dict[str, int] = {}
        self.compute_pids = (os.getpid(),)  # the model runs on this process's threads

    def _serve_adapters(self, base, adapters: list[Candidate]) -> None:
        """Every adapter on one PEFT copy of the base's module tree, sharing its weight tensors."""
        import copy

        from peft import PeftModel

        base_tensors = [*base.parameters(), *base.buffers()]
        shared = copy.deepcopy(base, memo={id(t): t for t in base_tensors})
        for i, candidate in enumerate(adapters):
            try:
                if i == 0:
                    shared = PeftModel.from_pretrained(shared, candidate.adapter_dir,
                                                       adapter_name=candidate.label)
                else:
                    shared.load_adapter(candidate.adapter_dir, adapter_name=candidate.label)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise TunelensError(f"adapter {candidate.adapter_dir} does not fit the base: "
                                    f"{str(exc).splitlines()[0]}") from None
        shared.to(self.device).eval()
        parameters = dict(shared.named_parameters())
        for candidate in adapters:
            self.models[candidate.label] = shared
            self.weights_bytes[candidate.label] = self.weights_bytes[self.base_label]
            self.adapter_bytes[candidate.label] = tensor_bytes(
                parameters[n] for n in adapter_parameter_names(shared, candidate.label))
            self.served_as[candidate.label] = ADAPTER_SERVED_AS

    def _serve_merged(self, base, adapters: list[Candidate]) -> None:
        """Each adapter folded into a copy of the base (PEFT merge_and_unload)."""
        import copy

        from peft import PeftModel

        for candidate in adapters:
            merged = PeftModel.from_pretrained(copy.deepcopy(base), candidate.adapter_dir
                                               ).merge_and_unload().to(self.device).eval()
            self.models[candidate.label] = merged
            self.weights_bytes[candidate.label] = tensor_bytes(
                [*merged.parameters(), *merged.buffers()])
            self.adapter_bytes[candidate.label] = 0
            self.served_as[candidate.label] = MERGED_SERVED_AS

    def request(self, candidate: Candidate, prompt_ids: list[int], settings: GenerationSettings,
                tokenizer) -> tuple[ServedRequest, int]:
        """One request alone: its time, its first token's, and the bytes of the cache it left."""
        torch = self._torch
        model = self.models[candidate.label]
        if self.served_as[candidate.label] == ADAPTER_SERVED_AS:
            model.set_adapter(candidate.label)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(settings.seed)
        served, cache = self._generate_timed(candidate, prompt_ids, settings, tokenizer)
        if on_gpu:
            self.peak_allocated[candidate.label] = max(self.peak_allocated.get(candidate.label, 0),
                                                       torch.cuda.max_memory_allocated())
        return served, cache_bytes(cache)

    def _generate_timed(self, candidate: Candidate, prompt_ids: list[int],
                        settings: GenerationSettings, tokenizer) -> tuple[ServedRequest, object]:
        """One `generate` of the candidate's model timed from its start to its first and last
        token; the request and the KV cache it left."""
        torch = self._torch
        model = self.models[candidate.label]
        on_gpu = self.device.type == "cuda"
        clock = _FirstTokenClock()
        with torch.inference_mode():
            start = time.perf_counter()
            output = model.generate(
                input_ids=torch.tensor([prompt_ids], device=self.device),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device),
                max_new_tokens=settings.max_new_tokens, streamer=clock,
                return_dict_in_generate=True, **hf_sampling_options(settings, tokenizer))
            if on_gpu:
                torch.cuda.synchronize()
            end = time.perf_counter()
        generated = output.sequences.shape[1] - len(prompt_ids)
        ttft = (clock.first - start) * 1e3 if clock.first is not None else math.nan
        return ServedRequest((end - start) * 1e3, ttft, generated,
                             len(prompt_ids) + max(generated - 1, 0)), output.past_key_values

    def serve_together(self, candidate: Candidate, prompts: list[list[int]],
                       settings: GenerationSettings, tokenizer) -> list[ServedRequest]:
        """Every prompt at once, one thread per caller, each running its own `generate` on the
        shared model, as a plain transformers server does: nothing batches them, they share the
        cores. Each request timed from its own start to its first and last token."""
        from concurrent.futures import ThreadPoolExecutor

        if self.served_as[candidate.label] == ADAPTER_SERVED_AS:
            self.models[candidate.label].set_adapter(candidate.label)
        with ThreadPoolExecutor(max_workers=len(prompts)) as callers:
            answers = list(callers.map(
                lambda ids: self._generate_timed(candidate, ids, settings, tokenizer), prompts))
        return [served for served, _ in answers]

    def memory(self, candidate: Candidate, kv_peak: int) -> MemoryProfile:
        """Memory as served, from the loaded tensors (and torch's allocator on a GPU)."""
        on_gpu = self.device.type == "cuda"
        label = candidate.label
        return MemoryProfile(
            label=label, served_as=self.served_as[label], backend=self.backend,
            weights_bytes=self.weights_bytes[label], adapter_bytes=self.adapter_bytes[label],
            lora_buffers_bytes=0, kv_cache_peak_bytes=kv_peak,
            peak_allocated_bytes=self.peak_allocated.get(label) if on_gpu else None,
            source=(f"transformers on {self.device.type}: weights = numel x element size of the "
                    f"loaded parameters and buffers; adapter = the same over this adapter's PEFT "
                    f"tensors; LoRA buffers 0 (PEFT preallocates none); KV cache = bytes of the "
                    f"largest cache a request left (its key and value tensors)"
                    + ("; peak allocated = torch.cuda.max_memory_allocated during its requests "
                       "(with every model of the comparison loaded)" if on_gpu else "")),
            not_measured=() if on_gpu else (
                "peak_allocated_bytes: torch keeps no allocator statistics on the CPU",))

    def close(self) -> None:
        import gc

        self.models.clear()
        gc.collect()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()


def start_engine(base_dir: Path, adapters: list[Path], evaluation: EvaluationSettings,
                 settings: GenerationSettings, max_model_len: int, *,
                 inspect_workers: bool = False, served_as: str | None = None) -> TransformersEngine:
    """The base on evaluation.transformers' device and dtype; adapters attach when first used."""
    return TransformersEngine(base_dir, evaluation.transformers)


def start_server(base_dir: Path, candidates: list[Candidate], evaluation: EvaluationSettings,
                 served: str) -> TransformersServer:
    """The base and every candidate as served, in this process."""
    return TransformersServer(base_dir, candidates, evaluation.transformers, served)


BACKEND = Backend("transformers", title="transformers", available=lambda: True,
                  missing="transformers is not importable here", start=start_engine,
                  start_server=start_server)
