"""When and on which engine each model is timed as served (`ServedTiming`).

Latency (`LatencyProfile`, one per model) is measured at concurrency 1 on a sample of the test rows,
after warm-up requests, each model on a server configured the way it will be served:

* the base on an engine without LoRA (an engine started with LoRA enabled runs the LoRA kernels for
  base requests too, so the base would be timed slower than it serves);
* a candidate with ``evaluation.served: adapter`` as a LoRA on a LoRA-enabled engine of the base, or
  with ``merged`` as its weights merged into the base (PEFT ``merge_and_unload``) on a plain engine.

Each timed row sends the base, then the candidate, then the base again, so the candidate's request
sits between two base requests on the same prompt. With transformers all of them live in one
process (an adapter candidate shares the base's weight tensors), after the generation model is
gone, and the three requests follow each other. With vLLM only one engine is in memory at a time,
so the engines take turns and every row's three requests are minutes apart (`ServedTiming`):

* ``adapter``: a plain engine times the base; then the LoRA-enabled engine that generates the
  batch outputs (and scores the texts) times the adapters, once its batch work is done: it is the
  engine they would be served on (the same base, adapters, max_loras, max_lora_rank, options,
  max_model_len and seed), with its prefix cache emptied first so no timed prompt is cached by the
  batch; then a plain engine times the base again;
* ``merged``: after the generation engine, a plain engine each for the base, every merged
  candidate, the base again.

A backend with `start_server` (transformers, an OpenAI-compatible endpoint) times every model on
that one server; any other backend's engines take turns, as vLLM's do above.

Under load (`evaluation.latency.concurrency`): on each server, after the concurrency-1 rows, every
level N in turn sends the same rows in windows of N requests at once (`windows_of`), each window to
every model of the sequence in the same rotation, so the base before and after the candidates is
the noise floor at that level too.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tunelens.evaluators.engines.choice import BACKENDS
from tunelens.evaluators.engines.interface import (ADAPTER_SERVED_AS, BASE_SERVED_AS,
                                                   MERGED_SERVED_AS, Candidate, MemoryProfile)
from tunelens.evaluators.engines.transformers import merge_adapter
from tunelens.evaluators.timing.core_wait import SchedulerTimes, waiting_share
from tunelens.evaluators.timing.profiles import (LatencyProfile, ServingFigures,
                                                 ServingSettings)
from tunelens.evaluators.timing.rules import LatencyJudgement
from tunelens.settings import EvaluationSettings


def sample_rows(n_rows: int, wanted: int) -> list[int]:
    """`wanted` row indices spread evenly over the evaluated rows (all of them if fewer)."""
    if wanted >= n_rows:
        return list(range(n_rows))
    return sorted({int(round(i)) for i in np.linspace(0, n_rows - 1, wanted)})


@dataclass(frozen=True)
class _Pass:
    """One engine in memory: the folder it loads, the adapters it attaches, and the models
    each timed row sends a request to, in order (a merged candidate has no adapter_dir here)."""

    model_dir: object
    adapters: tuple
    sequence: tuple
    served_as: str
    merge_from: object = None  # adapter folder merged into the base before the pass, if any
    # timed on the group's generation engine, which is started as this pass's engine would be
    on_generation_engine: bool = False


def _engine_passes(base_dir, candidates: list, served: str) -> list[_Pass]:
    """Base, the candidates as served, base again: one engine in memory at a time. Adapters served
    as such go on the LoRA-enabled generation engine; merged ones on engines of their own."""
    base = next(c for c in candidates if c.adapter_dir is None)
    adapters = [c for c in candidates if c.adapter_dir is not None]
    base_pass = _Pass(base_dir, (), (base,), BASE_SERVED_AS)
    middle = ([_Pass(base_dir, tuple(adapters), tuple(adapters), ADAPTER_SERVED_AS,
                     on_generation_engine=True)]
              if served == "adapter" and adapters else
              [_Pass(None, (), (Candidate(c.label, None, c.version),), MERGED_SERVED_AS,
                     merge_from=c.adapter_dir) for c in adapters])
    return [base_pass, *middle, base_pass]


def windows_of(rows: list[int], concurrency: int) -> list[tuple[int, ...]]:
    """The rows in windows of `concurrency` requests sent together: ceil(rows / concurrency)
    windows, the rows taken in order and again from the first to fill the last window."""
    count = -(-len(rows) // concurrency)
    cycled = [rows[i % len(rows)] for i in range(count * concurrency)]
    return [tuple(cycled[i:i + concurrency]) for i in range(0, len(cycled), concurrency)]


def _send(server, model, window: tuple[int, ...], prompt_ids, settings, tokenizer
          ) -> tuple[list, float, int]:
    """One window of requests to `model`: one request alone, or every prompt of the window in
    flight together. Its timed requests (each with the window's core wait), its wall time in
    seconds, and the largest KV cache a request alone held (0 under load: not read there)."""
    before = SchedulerTimes.of(server.compute_pids)
    start = time.perf_counter()
    if len(window) == 1:
        served, kv = server.request(model, prompt_ids[window[0]], settings, tokenizer)
        requests = [served]
    else:
        requests = server.serve_together(model, [prompt_ids[r] for r in window], settings,
                                         tokenizer)
        kv = 0
    wall = time.perf_counter() - start
    wait = waiting_share(before, SchedulerTimes.of(server.compute_pids))
    return [replace(r, core_wait=wait) for r in requests], wall, kv


@dataclass
class _Timed:
    """One level's timings on one server: per label, per occurrence in the sequence (the base twice
    when it opens and closes it), the requests and the windows' wall times."""

    requests: dict[str, list[list]] = field(default_factory=dict)
    walls: dict[str, list[list[float]]] = field(default_factory=dict)

    def add(self, label: str, occurrence: int, requests: list, walls: list[float]) -> None:
        streams = self.requests.setdefault(label, [])
        if len(streams) <= occurrence:
            streams.append([])
            self.walls.setdefault(label, []).append([])
        streams[occurrence].extend(requests)
        self.walls[label][occurrence].extend(walls)


def _time_rows(server, sequence: tuple, windows: list[tuple[int, ...]], prompt_ids, settings,
               tokenizer, progress) -> tuple[_Timed, dict[str, int]]:
    """Every window's requests in `sequence` order (the middle part rotated per window so no
    candidate always follows the same one). Returns the timings and each label's largest KV
    cache."""
    timed = _Timed()
    kv_peak: dict[str, int] = {}
    ends = 1 if len(sequence) > 2 and sequence[0] == sequence[-1] else 0
    middle = sequence[ends:len(sequence) - ends]
    for k, window in enumerate(windows):
        shift = k % len(middle) if middle else 0
        order = (*sequence[:ends], *middle[shift:], *middle[:shift], *sequence[len(sequence) - ends:])
        seen: dict[str, int] = {}
        for model in order:
            requests, wall, kv = _send(server, model, window, prompt_ids, settings, tokenizer)
            occurrence = seen.get(model.label, 0)
            seen[model.label] = occurrence + 1
            timed.add(model.label, occurrence, requests, [wall])
            kv_peak[model.label] = max(kv_peak.get(model.label, 0), kv)
            progress.update(len(window))
    return timed, kv_peak


def _warm_up(server, sequence: tuple, rows: list[int], prompt_ids, settings, tokenizer,
             warmup: int, progress) -> None:
    """`warmup` untimed requests alone to each distinct model of `sequence`."""
    for model in dict.fromkeys(sequence):
        for i in range(warmup):
            server.request(model, prompt_ids[rows[i % len(rows)]], settings, tokenizer)
            progress.update()


class ServedTiming:
    """Latency and memory as served for the base and every candidate of one engine group, measured
    engine by engine around the group's generation engine (evaluators.run.run_group):

    1. `before_generation()`: vLLM with adapters served as such: a plain engine times the base
       (the first half of the A/A pair); nothing otherwise.
    2. The caller starts the generation engine (with `inspect_workers` when
       `uses_generation_engine`), runs its batch phases and text scoring, then calls
       `on_generation_engine(engine)`: the adapters timed on it. It is the engine their own
       LoRA-enabled server would be: the same base, adapters (so max_loras and max_lora_rank),
       evaluation.vllm options, max_model_len and seed; its prefix cache is emptied first, so no
       timed prompt is cached by the batch phases.
    3. After the generation engine closed, `after_generation()` runs the rest and returns the
       figures: transformers, every model in one process; vLLM, each merged candidate on an engine
       of its own, then the base on a plain engine again (the second half of the A/A pair).

    `judgement`: while its latency rule is undecided after a round, another round of `sample_rows`
    rows, drawn again from the evaluated rows, is timed in the same rotation, up to
    `evaluation.latency.max_rounds` rounds in all: transformers on the same server (no warm-up);
    vLLM on fresh engines in the same order (base, the candidates as served, base: the adapters'
    engine started as the generation engine was), each warmed up again.

    Needs `evaluation.latency.sample_rows` > 0 (the caller skips the timing otherwise).
    `candidates`: the base (adapter_dir None) first, then the adapters, as in the batch phases;
    `prompt_ids`: the evaluated rows' token ids.
    """

    def __init__(self, base_dir, candidates: list, prompt_ids: list[list[int]], tokenizer,
                 settings, evaluation: EvaluationSettings, backend: str, *, max_model_len: int, work_dir,
                 judgement: LatencyJudgement | None = None):
        self.serving = ServingSettings.from_config(evaluation)
        self.base_dir, self.work_dir = Path(base_dir), Path(work_dir)
        self.candidates, self.prompt_ids, self.tokenizer = candidates, prompt_ids, tokenizer
        self.settings, self.evaluation, self.backend = settings, evaluation, backend
        self.max_model_len, self.judgement = max_model_len, judgement
        self.rows = sample_rows(len(prompt_ids), self.serving.sample_rows)
        self._timed_rows = list(self.rows)  # every round's rows, in request order
        self._rounds = 1
        self._seen_in_round: dict[str, int] = {}  # passes of each model timed in this round
        self.base = next(c for c in candidates if c.adapter_dir is None)
        warmup = self.serving.warmup_requests
        self._start_server = BACKENDS[backend].start_server
        self._start_engine = BACKENDS[backend].start
        if self._start_server is not None:
            self.passes: list[_Pass] = []
            # one process: the warm-up requests go to each distinct model once
            self.sequence = (self.base, *[c for c in candidates if c.adapter_dir is not None],
                             self.base)
            self.total = (len(self.sequence) * self._requests_per_model(len(self.rows))
                          + (len(self.sequence) - 1) * warmup)
        else:
            self.passes = _engine_passes(self.base_dir, candidates, self.serving.served)
            self.total = sum(len(p.sequence) * (self._requests_per_model(len(self.rows)) + warmup)
                             for p in self.passes)
        shared = [i for i, p in enumerate(self.passes) if p.on_generation_engine]
        self._shared = shared[0] if shared else None  # index of the generation engine's pass
        self._done_passes = 0
        self._done_requests = 0  # for the progress bar, which spans every engine
        # per concurrency level, every round's timings appended per pass
        self._levels = {level: _Timed() for level in self.serving.concurrency}
        self._kv_peak: dict[str, int] = {}
        self._memory: dict[str, MemoryProfile] = {}
        self._served_as: dict[str, str] = {}
        self._loads: list[str] = []
        self._order: list[str] = []

    @property
    def uses_generation_engine(self) -> bool:
        """Whether some models are timed on the generation engine (engines taking turns, adapters
        served as such)."""
        return self._shared is not None

    def before_generation(self) -> None:
        """The engines that run before the generation engine's pass."""
        self._run_passes(self._shared if self._shared is not None else 0)

    def on_generation_engine(self, engine) -> None:
        """Time this pass's models on the generation engine (left open: the caller closes it)."""
        if self._shared is None:
            return
        if self._done_passes != self._shared:
            raise RuntimeError("ServedTiming: before_generation() must run first")
        plan = self.passes[self._shared]
        engine.forget_cached_prompts()
        self._time(engine, plan,
                   "; the generation engine, after its batch phases", self.rows)
        self._done_passes += 1

    def after_generation(self) -> ServingFigures:
        """The engines after the generation engine, then every model's figures."""
        if self._shared is not None and self._done_passes <= self._shared:
            raise RuntimeError("ServedTiming: on_generation_engine() must run first")
        if self._start_server is not None:
            server = self._start_server(self.base_dir, self.candidates, self.evaluation,
                                        self.serving.served)
            try:
                self._served_as = dict(server.served_as)
                self._time(server, None, "", self.rows)
                self._more_rounds(server)
            finally:
                server.close()
            order = (f"one process, each row: {' -> '.join(m.label for m in self.sequence)} "
                     f"(candidates rotated)")
        else:
            self._run_passes(len(self.passes))
            self._more_rounds(None)
            order = " -> ".join(self._order)
        order += f"; {self._rounds} round(s) of {len(self.rows)} rows"
        if self.judgement is not None:
            order += (f" (another round while the latency rule of "
                      f"{', '.join(self.judgement.candidates)} "
                      f"was undecided, at most {self.serving.max_rounds})")
        return self._figures(order)

    def _run_passes(self, stop: int) -> None:
        """This round's passes from the next one up to `stop` (excluded)."""
        while self._done_passes < stop:
            self._run_pass(self.passes[self._done_passes], self.rows, "")
            self._done_passes += 1

    def _run_pass(self, plan: _Pass, rows: list[int], where: str) -> None:
        """One pass on an engine of its own, started, warmed up, timed on `rows` and closed."""
        model_dir = plan.model_dir
        if plan.merge_from is not None:
            model_dir = merge_adapter(self.base_dir, plan.merge_from,
                                      self.work_dir / f"merged-{plan.sequence[0].label}")
        try:
            server = self._start_engine(model_dir, [c.adapter_dir for c in plan.adapters],
                                        self.evaluation, self.settings, self.max_model_len,
                                        inspect_workers=True, served_as=plan.served_as)
            try:
                self._time(server, plan, where, rows, warmup=True)
            finally:
                server.close()
        finally:
            if plan.merge_from is not None:
                shutil.rmtree(model_dir, ignore_errors=True)

    def _more_rounds(self, server) -> None:
        """Rounds after the first while the judged latency rule is undecided: on `server`
        (transformers), or on fresh vLLM engines for every pass (`server` None)."""
        rng = np.random.default_rng(self.settings.seed)
        while (self.judgement is not None and self._rounds < self.serving.max_rounds
               and self.judgement.undecided(self._figures(""))):
            rows = [int(r) for r in sorted(rng.choice(len(self.prompt_ids), size=len(self.rows),
                                                      replace=False))]
            self._rounds += 1
            self._seen_in_round = {}
            self._timed_rows.extend(rows)
            per_model = self._requests_per_model(len(rows))
            if server is not None:
                self.total += len(self.sequence) * per_model
                self._time(server, None, "", rows, warmup=False)
                continue
            self.total += sum(len(p.sequence) * (per_model + self.serving.warmup_requests)
                              for p in self.passes)
            for plan in self.passes:
                self._run_pass(plan, rows, f"; round {self._rounds}"
                               + ("; started as the generation engine was"
                                  if plan.on_generation_engine else ""))

    def _requests_per_model(self, n_rows: int) -> int:
        """Timed requests per model and pass for `n_rows` rows, over every concurrency level."""
        return sum(len(windows_of(list(range(n_rows)), level)) * level
                   for level in self.serving.concurrency)

    def _time(self, server, plan: _Pass | None, where: str, rows: list[int], *,
              warmup: bool = True) -> None:
        """Warm-up (unless `warmup` is False: the same server's next round), then `rows` on
        `server` at each concurrency level (the pass's sequence, or the transformers one), each
        pass of a model in this round appended to that pass's timings."""
        sequence = self.sequence if plan is None else plan.sequence
        with tqdm(total=self.total, initial=self._done_requests, desc="served latency",
                  leave=False) as progress:
            _warm_up(server, sequence, rows, self.prompt_ids, self.settings, self.tokenizer,
                     self.serving.warmup_requests if warmup else 0, progress)
            for level, timings in self._levels.items():
                timed, kv_peak = _time_rows(server, sequence, windows_of(rows, level),
                                            self.prompt_ids, self.settings, self.tokenizer,
                                            progress)
                self._append(timings, timed)
                if level == 1:
                    self._note_memory(server, sequence, kv_peak)
            self._done_requests = progress.n
        for label, occurrences in timed.requests.items():
            self._seen_in_round[label] = self._seen_in_round.get(label, 0) + len(occurrences)
        self._loads.append(f"{os.getloadavg()[0]:.2f}")
        if plan is not None:
            for model in plan.sequence:
                self._served_as.setdefault(model.label, plan.served_as)
            self._order.append(f"{', '.join(m.label for m in plan.sequence)} engine "
                               f"({plan.served_as}{where})")

    def _append(self, timings: _Timed, timed: _Timed) -> None:
        """One server's timings of a level added to that level's: a model's k-th pass in this
        round extends its k-th stream (the first round opens them)."""
        for label, occurrences in timed.requests.items():
            first = self._seen_in_round.get(label, 0)
            for index, requests in enumerate(occurrences, first):
                timings.add(label, index, requests, timed.walls[label][index - first])

    def _note_memory(self, server, sequence: tuple, kv_peak: dict[str, int]) -> None:
        """Each model's memory as served on `server`, with its largest KV cache so far."""
        for model in dict.fromkeys(sequence):
            label = model.label
            self._kv_peak[label] = max(self._kv_peak.get(label, 0), kv_peak[label])
            self._memory[label] = server.memory(model, self._kv_peak[label])

    def _profile(self, candidate: Candidate, level: int) -> LatencyProfile:
        """`candidate`'s timings at `level` over every round: its first pass, and the base's last
        one as the A/A pair's other half."""
        timings, label = self._levels[level], candidate.label
        first = timings.requests[label][0]
        repeat = timings.requests[label][-1] if label == self.base.label else None
        per_round = len(self.rows)
        rows = [row for k in range(0, len(self._timed_rows), per_round)
                for window in windows_of(self._timed_rows[k:k + per_round], level)
                for row in window]
        return LatencyProfile(
            label=label, served_as=self._served_as[label], backend=self.backend,
            rows=tuple(rows), e2e_ms=tuple(r.e2e_ms for r in first),
            ttft_ms=tuple(r.ttft_ms for r in first),
            output_tokens=tuple(r.output_tokens for r in first),
            warmup_requests=self.serving.warmup_requests,
            repeat_e2e_ms=None if repeat is None else tuple(r.e2e_ms for r in repeat),
            core_wait=tuple(r.core_wait for r in first),
            round_rows=len(windows_of(self.rows, level)) * level,
            repeat_core_wait=None if repeat is None else tuple(r.core_wait for r in repeat),
            load_average=float(self._loads[-1]), concurrency=level,
            window_s=None if level == 1 else tuple(timings.walls[label][0]))

    def _figures(self, order: str) -> ServingFigures:
        serving = self.serving
        levels = ", ".join(map(str, serving.concurrency))
        notes = (f"served latency: {len(self._timed_rows)} rows per model at concurrency 1 after "
                 f"{serving.warmup_requests} warm-up requests per model"
                 + (f", then the same rows at {levels} requests in flight together "
                    f"(windows of that many requests sent at once, base before and after the "
                    f"candidates)" if len(serving.concurrency) > 1 else "")
                 + f"; {order}; 1-minute load "
                 f"average after each {'round' if self._start_server is not None else 'engine'}: "
                 f"{', '.join(self._loads)}",)
        return ServingFigures(
            tuple(self._profile(c, 1) for c in self.candidates),
            tuple(self._memory[c.label] for c in self.candidates), notes,
            tuple(self._profile(c, level) for level in serving.concurrency if level > 1
                  for c in self.candidates))
