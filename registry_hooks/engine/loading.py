"""Reading adapters and base models without loading a model: headers first, one tensor at a time.

An adapter is a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors, or
adapter_model.bin read only through torch.load(weights_only=True)), an mlx-lm LoRA folder
(adapter_config.json with lora_parameters + adapters.safetensors), or an MLflow transformers model
directory holding one under peft/. Every LoRA module stays factored (L, R, scale); shapes are checked
against each other and the config before any math runs.

Uploaded files are hostile until checked: a safetensors header is validated by check_safetensors
before safetensors maps it, files must resolve inside the adapter directory (no symlink out), and
JSON files are size-capped. A `.bin` must be torch.save's uncompressed zip (check_torch_zip) and is
read only by torch's weights-only unpickler, which refuses every global but tensor rebuilding, so a
pickle that names code fails before anything is called.
"""
from __future__ import annotations

import functools
import json
import math
import pickle
import re
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from tunelens.errors import TunelensError

from .lora_math import lora_scale
from .naming import expert_parameter_order, strip_peft_prefix

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MLX_WEIGHTS_NAME = "adapters.safetensors"  # mlx-lm's adapter file (tuner/trainer.py)

# PEFT's saved key suffixes (an adapter name such as `.default` may sit before `.weight`).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                       r"lora_magnitude_vector)(?:\.default)?(?:\.(?P<param>weight|bias))?$")
# mlx-lm saves dict(tree_flatten(model.trainable_parameters())): `<module path>.lora_a|lora_b`.
_MLX_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>a|b)$")
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")
# Saved tensors PEFT writes that are neither LoRA factors nor full weights: named, never misread
# as modules_to_save. Trainable tokens keep new rows of an embedding; any other `lora_*` tensor
# belongs to a LoRA variant whose ΔW is not s·B·A.
_UNANALYSED_KEY = re.compile(r"\.(?P<kind>token_adapter|lora_[A-Za-z0-9_]+)\.")
UNANALYSED_KINDS = {"token_adapter": "trainable-token rows (trainable_token_indices)"}
# adapter_config.json fields of LoRA variants whose applied change is not the plain ΔW = s·B·A
# tunelens computes from the factors: each one set is named in the result's warnings.
VARIANT_FIELDS = {
    "use_qalora": "QA-LoRA (inputs pooled in groups before A)",
    "alora_invocation_tokens": "activated LoRA (applied only after the invocation tokens)",
    "layer_replication": "layer replication (layers share adapted weights)",
    "use_bdlora": "block-diagonal LoRA (factors sharded in blocks)",
    "kasa_config": "KaSA (a singular-value-based update of the base)",
    "arrow_config": "Arrow (a router mixing several adapters)",
    "monteclora_config": "MonteCLoRA (a stochastic, sampled update)",
    "velora_config": "VeLoRA",
}

MAX_JSON_BYTES = 8 * 1024 ** 2  # a PEFT config is ~1 KB; rank_pattern for 1000s of modules < 1 MB
# safetensors allows 100 MB; a 70B adapter's header is ~150 KB, and parsing 16 MiB of JSON takes
# ~140 MB of Python objects (100 MB would take ~0.9 GB): the cap bounds the hook service's memory.
MAX_HEADER_BYTES = 16 * 1024 ** 2
# Bytes per element of every safetensors dtype tunelens reads; LoRA weights must be floating point.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
               "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SAFETENSORS_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                            "BF16": torch.bfloat16}
MAX_ALPHA = 1e6  # real lora_alpha values are 1..~1000; far larger ones overflow the float64 math
# A repeated group ((a+)+, (a|a)*, (.*){9}) in a rank/alpha pattern can make re.match take
# exponential time (ReDoS): PEFT's module-pattern rule runs user regexes over module names.
_REPEATED_GROUP = re.compile(r"\)[*+{]")
MAX_PATTERNS = 4096  # rank_pattern keys; a per-module pattern for a 405B model needs ~900
MAX_DELTA_ENTRY = 1e100  # |ΔW| entries beyond this overflow float64 Gram and SVD products


class AnalysisInputError(TunelensError):
    """An adapter or base model that cannot be analysed; the message says what and what to do."""


def find_adapter_dir(path: str | Path) -> Path | None:
    """The directory holding adapter_config.json: `path` itself or its peft/ folder (MLflow model)."""
    path = Path(path)
    for candidate in (path, path / "peft"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern p with
    re.match(rf"(.*\\.)?({p})$", key) wins; no match gives the key itself."""
    for pattern in pattern_keys:
        if _pattern_regex(pattern).match(key_to_match):
            return pattern
    return key_to_match


@functools.lru_cache(maxsize=2 * MAX_PATTERNS)
def _pattern_regex(pattern: str) -> re.Pattern:
    """Compiled once: re's own cache holds 512, and a per-module rank_pattern has one per module."""
    return re.compile(rf"(.*\.)?({pattern})$")


@dataclass
class AdapterConfig:
    """adapter_config.json as the analysis uses it."""

    raw: dict
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str | None
    modules_to_save: list[str] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None
    task_type: str | None
    bias: str
    lora_bias: bool
    target_parameters: list[str] = field(default_factory=list)  # PEFT ParamWrapper targets
    format: str = "peft"  # "peft", or "mlx-lm" (adapters.safetensors, lora_parameters)
    scale: float | None = None  # mlx-lm's multiplier of B·A, used as is (PEFT: α/r)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """r and alpha for one module path, with rank_pattern / alpha_pattern applied like PEFT."""
        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern, module_name), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern, module_name),
                                       self.lora_alpha)
        return int(r), float(alpha)


def inside(path: Path, directory: Path) -> Path:
    """`path` itself if it resolves inside `directory`; a symlink out of it (to /etc/passwd, to
    another adapter) is refused, so an uploaded link never makes tunelens read a file it names.
    A Hugging Face cache snapshot (models--*/snapshots/<rev>/) may link into its own blobs/."""
    target, root = path.resolve(), directory.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        root = root.parent.parent
    if not target.is_relative_to(root):
        raise AnalysisInputError(f"{path} is a symbolic link to {target}, outside the adapter "
                                 f"directory {directory}; copy the real file in (cp -L)")
    return path


def read_json_object(path: Path) -> dict:
    """A JSON object from a file of at most MAX_JSON_BYTES; one readable error line otherwise."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise AnalysisInputError(f"{path} is {size:,} bytes, larger than the {MAX_JSON_BYTES:,}"
                                     "-byte limit for a config file; re-save the adapter with PEFT")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnalysisInputError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                                 "re-save the adapter with PEFT") from None
    except RecursionError:
        raise AnalysisInputError(f"{path} is JSON nested too deeply to be a config; re-save the "
                                 "adapter with PEFT") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnalysisInputError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise AnalysisInputError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


def check_safetensors(path: Path, dtypes=tuple(DTYPE_BYTES)) -> dict:
    """Refuse a safetensors file whose header lies, before safetensors or torch reads it, so no
    size or offset in it can make anything allocate or read out of bounds; returns the checked
    header with each data_offsets made absolute (from the file's start). Checks: an 8-byte
    little-endian header length within the file and MAX_HEADER_BYTES; a JSON object of name ->
    {dtype, shape, data_offsets} (plus `__metadata__`); every dtype in `dtypes`; shapes of
    non-negative ints; each [start, end) exactly dtype size x numel bytes, and together tiling
    the data buffer from 0 to its end with no overlap, gap or overrun (safetensors' own rule)."""
    def invalid(problem: str) -> AnalysisInputError:
        return AnalysisInputError(f"{path} is truncated, corrupt or not safetensors: {problem}; "
                                  "re-save it with save_pretrained (safetensors)")

    size = path.stat().st_size
    header, length = _safetensors_header(path, size, invalid)
    data_bytes = size - 8 - length
    _check_tiling([_tensor_span(name, entry, dtypes, data_bytes, invalid)
                   for name, entry in header.items() if name != "__metadata__"],
                  data_bytes, invalid)
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["data_offsets"] = [8 + length + o for o in entry["data_offsets"]]
    return header


def _safetensors_header(path: Path, size: int, invalid) -> tuple[dict, int]:
    """The header object of a `size`-byte safetensors file, and its length in bytes."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise invalid(f"{size} bytes, too short for the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise invalid(f"header length {length:,} exceeds the file ({size:,} bytes) or the "
                          f"{MAX_HEADER_BYTES:,}-byte limit (truncated or not safetensors)")
        text = file.read(length)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise invalid("the header is not JSON") from None
    if not isinstance(header, dict):
        raise invalid(f"the header is a JSON {type(header).__name__}, not an object")
    return header, length


def _tensor_span(name: str, entry, dtypes, data_bytes: int, invalid) -> tuple[int, int, str]:
    """(start, end, name) of one header entry, whose dtype, shape and size are checked."""
    if not isinstance(entry, dict):
        raise invalid(f"entry {name!r} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in dtypes:
        raise invalid(f"tensor {name!r} has dtype {dtype!r}, expected one of {', '.join(dtypes)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise invalid(f"tensor {name!r} has shape {shape!r}, not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise invalid(f"tensor {name!r} has data_offsets {offsets!r}, not [start, end]")
    start, end = offsets
    needed = DTYPE_BYTES[dtype] * math.prod(shape)
    if end - start != needed:
        raise invalid(f"tensor {name!r} ({dtype} {shape}) needs {needed:,} bytes but its "
                      f"data_offsets {offsets} span {end - start:,}")
    if end > data_bytes:
        raise invalid(f"tensor {name!r} has data_offsets {offsets} past the end of the "
                      f"{data_bytes:,}-byte data (truncated?)")
    return start, end, name


def _check_tiling(spans: list[tuple[int, int, str]], data_bytes: int, invalid) -> None:
    """The spans cover [0, data_bytes) exactly: no overlap, gap or overrun."""
    covered = 0
    for start, end, name in sorted(spans):
        if start != covered:
            raise invalid(f"tensor {name!r} starts at byte {start:,} of the data where {covered:,} "
                          f"was expected (overlapping or gapped data_offsets)")
        covered = end
    if covered != data_bytes:
        raise invalid(f"the tensors cover {covered:,} of the {data_bytes:,} data bytes")


def check_torch_zip(path: Path) -> None:
    """Refuse a .bin that is not torch.save's zip container with every member stored uncompressed
    (as torch writes them), before torch reads it: then no tensor can be larger than the file. A
    deflated member (a zip bomb) or a legacy/raw pickle, whose storages are allocated at whatever
    size its pickle declares, is refused unread."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        raise AnalysisInputError(f"{path} is not a torch.save zip archive (a legacy or raw "
                                 "pickle, or truncated): refused unread; re-save the adapter as "
                                 "safetensors (save_pretrained)") from None
    unpacked = sum(member.file_size for member in members)
    compressed = any(member.compress_type != zipfile.ZIP_STORED for member in members)
    if compressed or unpacked > path.stat().st_size:
        raise AnalysisInputError(f"{path} has compressed members ({unpacked:,} bytes unpacked), "
                                 "which torch.save never writes: refused unread; re-save the "
                                 "adapter as safetensors (save_pretrained)")


def _is_rank(value) -> bool:
    return type(value) is int and value > 0


def _is_alpha(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and abs(value) <= MAX_ALPHA


def is_mlx_config(raw: dict) -> bool:
    """An mlx-lm adapter_config.json: `lora_parameters` and no PEFT `peft_type`."""
    return "peft_type" not in raw and isinstance(raw.get("lora_parameters"), dict)


def not_lora_reason(raw: dict) -> str | None:
    """Why an adapter_config.json is not a LoRA adapter tunelens analyses; None when it is one
    (PEFT's peft_type LORA, or mlx-lm's lora_parameters with fine_tune_type lora)."""
    if is_mlx_config(raw):
        kind = raw.get("fine_tune_type", "lora")
        return None if kind == "lora" else (f"an mlx-lm {kind!r} fine-tune (fine_tune_type), "
                                            "not LoRA: only LoRA adapters are analysed")
    peft_type = raw.get("peft_type")
    if str(peft_type).upper() != "LORA":
        return f"peft_type is {peft_type!r}, not LORA: only LoRA adapters are analysed"
    return None


def _mlx_config(path: Path, raw: dict) -> AdapterConfig:
    """mlx-lm's config: lora_parameters {rank, scale, dropout[, keys]}; its LoRALinear adds
    scale·(x·lora_a)·lora_b, so `scale` itself multiplies B·A (no α/r)."""
    reason = not_lora_reason(raw)
    if reason:
        raise AnalysisInputError(f"{path}: {reason}")
    params = raw["lora_parameters"]
    rank, scale = params.get("rank"), params.get("scale")
    if not _is_rank(rank):
        raise AnalysisInputError(f"{path}: lora_parameters.rank must be a positive integer, got "
                                 f"{rank!r}")
    if scale is None:
        raise AnalysisInputError(
            f"{path}: lora_parameters has no scale{' (only alpha)' if 'alpha' in params else ''}; "
            "mlx-lm multiplies B·A by scale and refuses a config without it, so the change this "
            "adapter applies is unknown: add the scale it was trained with")
    if not _is_alpha(scale):
        raise AnalysisInputError(f"{path}: lora_parameters.scale must be a number of magnitude at "
                                 f"most {MAX_ALPHA:g}, got {scale!r}")
    keys = params.get("keys")
    return AdapterConfig(
        raw=raw, peft_type="LORA", r=rank, lora_alpha=float(scale) * rank, use_rslora=False,
        use_dora=False, fan_in_fan_out=False,
        target_modules=keys if isinstance(keys, list) else None, modules_to_save=None,
        rank_pattern={}, alpha_pattern={}, base_model_name_or_path=raw.get("model"),
        task_type=None, bias="none", lora_bias=False, format="mlx-lm", scale=float(scale))


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    """Parse and check adapter_config.json (PEFT's or mlx-lm's); AnalysisInputError names what is
    wrong."""
    path = inside(adapter_dir / CONFIG_NAME, adapter_dir)
    raw = read_json_object(path)
    if is_mlx_config(raw):
        return _mlx_config(path, raw)
    peft_type = str(raw.get("peft_type") or "")
    if not peft_type:
        raise AnalysisInputError(f"{path} has no peft_type: is this a PEFT adapter?")
    if peft_type.upper() != "LORA":
        raise AnalysisInputError(f"the adapter in {adapter_dir} is a {peft_type} adapter; tunelens "
                                 "analyses LoRA adapters only (peft_type LORA)")
    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not _is_rank(r):
        raise AnalysisInputError(f"{path}: r must be a positive integer, got {r!r}")
    if not _is_alpha(alpha):
        raise AnalysisInputError(f"{path}: lora_alpha must be a number of magnitude at most "
                                 f"{MAX_ALPHA:g}, got {alpha!r}")
    for pattern_name, valid, values in (("rank_pattern", _is_rank, "positive integers"),
                                        ("alpha_pattern", _is_alpha, "numbers")):
        patterns = raw.get(pattern_name) or {}
        if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
            raise AnalysisInputError(f"{path}: {pattern_name} must map module patterns to {values}")
        if len(patterns) > MAX_PATTERNS:  # every module is matched against every pattern
            raise AnalysisInputError(f"{path}: {pattern_name} has {len(patterns):,} patterns, more "
                                     f"than the {MAX_PATTERNS:,} tunelens matches")
        for pattern in patterns:
            try:
                _pattern_regex(pattern)
            except re.error as exc:
                raise AnalysisInputError(f"{path}: {pattern_name} key {pattern!r} is not a regular "
                                         f"expression ({exc})") from None
            if _REPEATED_GROUP.search(pattern):
                raise AnalysisInputError(f"{path}: {pattern_name} key {pattern!r} repeats a group, "
                                         "which can take exponential time to match; use module "
                                         "names")
    return AdapterConfig(
        raw=raw, peft_type="LORA", r=r, lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora")), use_dora=bool(raw.get("use_dora")),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out")), target_modules=raw.get("target_modules"),
        modules_to_save=raw.get("modules_to_save"), rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"),
        bias=str(raw.get("bias") or "none"), lora_bias=bool(raw.get("lora_bias")),
        target_parameters=_target_parameters(path, raw.get("target_parameters")))


def _target_parameters(path: Path, value) -> list[str]:
    """adapter_config.json's target_parameters: a list of parameter paths (PEFT accepts no str)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AnalysisInputError(f"{path}: target_parameters must be a list of parameter paths, "
                                 f"got {value!r}")
    return value


class TensorFile:
    """The adapter's weight file: header (names, shapes) now, tensors one by one on request.

    A safetensors tensor is read (not mapped) into memory of its own at its checked offsets: a
    mapped file's pages stay resident while it is open, 1.2 GB of a 1.2 GB MoE adapter's peak.
    """

    def __init__(self, path: Path):
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None
        self._header: dict | None = None
        if path.suffix == ".safetensors":
            self._header = check_safetensors(path, FLOAT_DTYPES)
        else:
            check_torch_zip(path)
        try:
            if self._header is not None:
                self._shapes = {k: list(v["shape"]) for k, v in self._header.items()}
                self._file = open(path, "rb")  # the checked file, even if the path is replaced
                self._lock = threading.Lock()
            else:
                # Never unpickle arbitrary objects: weights_only refuses anything but tensors.
                with warnings.catch_warnings():  # its protocol notices are not the user's business
                    warnings.simplefilter("ignore")
                    loaded = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(loaded, dict) or not all(
                        isinstance(v, torch.Tensor) for v in loaded.values()):
                    raise ValueError("it does not hold a flat name -> tensor mapping")
                self._tensors = loaded
                self._shapes = {k: list(v.shape) for k, v in loaded.items()}
        except pickle.UnpicklingError as exc:
            refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise AnalysisInputError(
                f"{path} is corrupt or not a weights file: its pickle names "
                f"{refused[1] if refused else 'objects'}, not only tensors (refused, never run); "
                "re-save the adapter as safetensors (save_pretrained)") from None
        except Exception as exc:  # the readers raise many types; all mean "unreadable file"
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AnalysisInputError(f"{path} is truncated, corrupt or not a weights file "
                                     f"({detail[:200]}); re-save the adapter") from None

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> list[int]:
        return self._shapes[key]

    def numel(self, key: str) -> int:
        return math.prod(self._shapes[key])

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key] if self._tensors is not None else self._read(key)
        except Exception as exc:
            raise AnalysisInputError(f"{self.path}: cannot read tensor {key} ({exc}); the file is "
                                     "truncated or corrupt") from None

    def _read(self, key: str) -> torch.Tensor:
        """One safetensors tensor read at its checked offsets (little-endian bytes, as here)."""
        entry = self._header[key]
        tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_TORCH_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        with self._lock:
            self._file.seek(start)
            read = self._file.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
        if read != end - start:
            raise ValueError(f"read {read:,} of its {end - start:,} bytes")
        return tensor


@dataclass
class LoraModule:
    """One LoRA-adapted module, factored: ΔW = scale·L·R in Linear orientation [out, in]."""

    name: str  # module path without `base_model.model.`
    kind: str  # "lora" (Linear / Conv1D) or "embedding"
    rank: int
    alpha: float
    scale: float
    shape: tuple[int, int]  # ΔW [out, in] (embedding: the weight's [vocab, dim])
    keys: dict[str, str]  # "A", "B", optional "bias", "magnitude" -> tensor name in the file
    fan_in_fan_out: bool = False
    # A and B hold no NaN/Inf (seen by the opening check): the analysis need not scan them again.
    factors_finite: bool = False
    # mlx-lm stores each factor as the transpose of PEFT's: lora_a (in, r), lora_b (r, out).
    transposed: bool = False

    def factors(self, tensors: TensorFile, device: torch.device, dtype=torch.float64):
        """(L, R) as float64 on `device`: (lora_B, lora_A), or (lora_embedding_Aᵀ, lora_embedding_Bᵀ);
        mlx-lm's (lora_bᵀ, lora_aᵀ), or (lora_a, lora_b) for an embedding."""
        a = tensors.get(self.keys["A"]).to(device=device, dtype=dtype)
        b = tensors.get(self.keys["B"]).to(device=device, dtype=dtype)
        if self.transposed:
            a, b = a.T, b.T
        return (a.T, b.T) if self.kind == "embedding" else (b, a)

    def optional(self, tensors: TensorFile, part: str, device: torch.device, dtype=torch.float64):
        key = self.keys.get(part)
        return None if key is None else tensors.get(key).to(device=device, dtype=dtype)


def _finite_max(tensor: torch.Tensor) -> tuple[float, bool]:
    """(max |x| = max(−min x, max x) over the finite entries, whether every entry is finite): one
    pass, no copy, when they all are (aminmax propagates NaN and ±Inf)."""
    low, high = torch.aminmax(tensor)
    largest = max(-float(low), float(high))
    if math.isfinite(largest):
        return largest, True
    return float(torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0).abs().max()), False


def _factor_bound(tensors: TensorFile, keys: dict, scale: float, r: int) -> tuple[float, bool]:
    """(|s|·r·max|A|·max|B| >= max |ΔW_ij|, whether A and B hold only finite values)."""
    (a_max, a_finite), (b_max, b_finite) = (_finite_max(tensors.get(keys[f])) for f in "AB")
    return abs(scale) * r * a_max * b_max, a_finite and b_finite


@dataclass
class SavedTensor:
    """A full tensor saved in the adapter (modules_to_save, trained biases): ΔW needs the base."""

    name: str  # parameter path without `base_model.model.`, e.g. `score.weight`
    key: str
    shape: list[int]


@dataclass
class ExpertModule:
    """One 3-D experts parameter adapted through target_parameters (PEFT's ParamWrapper), factored.

    PEFT stores lora_A as (r·E, in) with expert e's rows at e·r..(e+1)·r, and lora_B as (out, r·E)
    with expert e's columns at e, e+E, e+2E, ... (its get_delta_weight reshapes B to (out, r, E)):
    ΔW_e = scale·B_e·A_e in Linear orientation [out, in].
    """

    name: str  # the parameter path, e.g. `model.layers.0.mlp.experts.gate_up_proj`
    module: str  # the experts module, e.g. `model.layers.0.mlp.experts`
    parameter: str  # `gate_up_proj`
    num_experts: int
    rank: int  # per expert
    alpha: float
    scale: float
    shape: tuple[int, int]  # each expert's ΔW [out, in]
    keys: dict[str, str]  # "A", "B" -> tensor names in the file
    factors_finite: bool = False  # as LoraModule's

    def factors(self, tensors: TensorFile, device: torch.device, dtype=torch.float64):
        """(L, R) stacked over experts: L = B_e (E, out, r), R = A_e (E, r, in), PEFT's slicing."""
        a = tensors.get(self.keys["A"]).to(device=device, dtype=dtype)
        b = tensors.get(self.keys["B"]).to(device=device)
        right = a.reshape(self.num_experts, self.rank, a.shape[-1])
        # Expert-major for the batched products, each expert's B_e kept as B_eᵀ (E, r, out) and
        # returned as its transposed view: copied from Bᵀ in runs of `out` values, a third of the
        # time of gathering (E, out, r) at a stride of E values (the products take either alike).
        left = b.T.contiguous().reshape(self.rank, self.num_experts, b.shape[0]).permute(1, 0, 2)
        return left.to(dtype, memory_format=torch.contiguous_format).transpose(-2, -1), right


@dataclass
class AdapterContents:
    """An opened, checked adapter: its config, factored modules and full tensors, nothing loaded."""

    directory: Path
    config: AdapterConfig
    tensors: TensorFile
    modules: list[LoraModule]
    saved: list[SavedTensor]
    trainable_params: int
    warnings: list[str] = field(default_factory=list)
    experts: list[ExpertModule] = field(default_factory=list)


def open_adapter(path: str | Path) -> AdapterContents:
    """Find, parse and check an adapter; raises AnalysisInputError with one line on bad input."""
    path = Path(path)
    if not path.exists():
        raise AnalysisInputError(f"{path} does not exist")
    adapter_dir = find_adapter_dir(path)
    if adapter_dir is None:
        raise AnalysisInputError(f"no {CONFIG_NAME} in {path} (nor in {path / 'peft'}): pass a PEFT "
                                 "or mlx-lm LoRA adapter directory or an MLflow model directory "
                                 "with peft/")
    config = read_adapter_config(adapter_dir)
    if config.format == "mlx-lm":
        return _open_mlx(adapter_dir, config)
    weights = adapter_dir / SAFETENSORS_NAME
    if not weights.is_file():
        weights = adapter_dir / BIN_NAME
    if not weights.is_file():
        raise AnalysisInputError(f"{adapter_dir} has {CONFIG_NAME} but neither {SAFETENSORS_NAME} "
                                 f"nor {BIN_NAME}")
    tensors = TensorFile(inside(weights, adapter_dir))
    modules, experts, saved, warnings, ignored = _collect(tensors, config, weights)
    if not modules and not saved and not experts:
        raise AnalysisInputError(f"{weights} holds no LoRA tensors (lora_A/lora_B): nothing to "
                                 "analyse")
    trainable = sum(tensors.numel(k) for k in tensors.keys() if k not in ignored)
    return AdapterContents(adapter_dir, config, tensors, modules, saved, trainable, warnings,
                           experts)


def _open_mlx(adapter_dir: Path, config: AdapterConfig) -> AdapterContents:
    """An mlx-lm adapter: adapters.safetensors holding only `<module>.lora_a` / `.lora_b`."""
    weights = adapter_dir / MLX_WEIGHTS_NAME
    if not weights.is_file():
        raise AnalysisInputError(f"{adapter_dir} has an mlx-lm {CONFIG_NAME} but no "
                                 f"{MLX_WEIGHTS_NAME}")
    tensors = TensorFile(inside(weights, adapter_dir))
    grouped: dict[str, dict[str, str]] = {}
    for key in tensors.keys():
        match = _MLX_LORA_KEY.match(key)
        if match is None:
            raise AnalysisInputError(f"{weights}: tensor {key} is not an mlx-lm LoRA factor "
                                     "(<module>.lora_a / .lora_b); only LoRA adapters are analysed")
        grouped.setdefault(match["module"], {})[match["kind"].upper()] = key
    warnings = []
    if "alpha" in config.raw["lora_parameters"]:
        warnings.append("lora_parameters.alpha is not used: mlx-lm multiplies B·A by scale alone "
                        f"(s = {config.scale:g} here; mlx-lm up to 0.14.0 multiplied by "
                        "scale·alpha/rank instead)")
    modules = [m for name, keys in sorted(grouped.items())
               if (m := _check_mlx_module(name, keys, tensors, config, weights, warnings))]
    if not modules:
        raise AnalysisInputError(f"{weights} holds no 2-D LoRA factors: nothing to analyse")
    trainable = sum(tensors.numel(k) for k in tensors.keys())
    return AdapterContents(adapter_dir, config, tensors, modules, [], trainable, warnings)


def _check_mlx_module(name: str, keys: dict, tensors: TensorFile, config: AdapterConfig,
                      weights: Path, warnings: list[str]) -> LoraModule | None:
    """mlx-lm's LoRALinear: lora_a (in, r), lora_b (r, out); LoRAEmbedding: lora_a (vocab, r),
    lora_b (r, dim). Checked against each other and lora_parameters.rank."""
    for needed in ("A", "B"):
        if needed not in keys:
            raise AnalysisInputError(f"{weights}: module {name} has no lora_{needed.lower()}; the "
                                     "adapter file is incomplete")
    a_shape, b_shape = tensors.shape(keys["A"]), tensors.shape(keys["B"])
    if len(a_shape) != 2 or len(b_shape) != 2:
        warnings.append(f"{name}: LoRA on a {len(a_shape)}-D (mixture-of-experts) weight is not "
                        "analysed")
        return None
    if a_shape[1] != b_shape[0] or a_shape[1] != config.r:
        raise AnalysisInputError(f"{weights}: module {name} has lora_a {a_shape} and lora_b "
                                 f"{b_shape}, not (in, r) and (r, out) with rank {config.r} from "
                                 "lora_parameters")
    embedding = "embed" in name.rsplit(".", 1)[-1]
    shape = (a_shape[0], b_shape[1]) if embedding else (b_shape[1], a_shape[0])
    if 0 in shape:
        raise AnalysisInputError(f"{weights}: module {name} has an empty ΔW; the adapter file is "
                                 "corrupt")
    bound, finite = _factor_bound(tensors, keys, config.scale, config.r)
    if not bound <= MAX_DELTA_ENTRY:
        raise AnalysisInputError(f"{weights}: module {name} has values whose ΔW could reach "
                                 f"{bound:.1e}, beyond float64 analysis; the adapter is corrupt")
    return LoraModule(name=name, kind="embedding" if embedding else "lora", rank=config.r,
                      alpha=config.lora_alpha, scale=config.scale, shape=shape, keys=keys,
                      factors_finite=finite, transposed=True)


def _collect(tensors: TensorFile, config: AdapterConfig, weights: Path):
    grouped: dict[str, dict[str, str]] = {}
    saved, warnings, ignored = [], [], set()
    unanalysed: dict[str, list[str]] = {}
    for key in tensors.keys():
        name = strip_peft_prefix(key)
        match = _LORA_KEY.match(name)
        if match:
            part = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
                    "lora_magnitude_vector": "magnitude"}[match["kind"]]
            if match["kind"] == "lora_B" and match["param"] == "bias":
                part = "bias"
            entry = grouped.setdefault(match["module"], {})
            entry[part] = key
            entry["_embedding"] = entry.get("_embedding") or ("embedding" in match["kind"])
        elif ".base_layer." in name:
            # PEFT saves the base embedding beside an embedding LoRA: a copy, not trained weights.
            ignored.add(key)
        elif (unknown := _UNANALYSED_KEY.search(name)) is not None:
            unanalysed.setdefault(unknown["kind"], []).append(key)
        else:
            saved.append(SavedTensor(_SAVED_WRAPPER.sub("", name), key, tensors.shape(key)))
    for kind, keys in sorted(unanalysed.items()):
        what = UNANALYSED_KINDS.get(kind, f"{kind} tensors (a LoRA variant tunelens does not "
                                          "analyse)")
        names = ", ".join(strip_peft_prefix(k) for k in keys[:3]) + (" …" if len(keys) > 3 else "")
        warnings.append(f"not analysed: {len(keys)} {what} tensor(s), "
                        f"{sum(tensors.numel(k) for k in keys):,} values ({names}); they are "
                        "counted as trainable parameters")
    for field_name, what in VARIANT_FIELDS.items():
        if config.raw.get(field_name) not in (None, False, [], {}, ""):
            warnings.append(f"adapter_config.json sets {field_name}: {what}; tunelens analyses "
                            "the factors as plain LoRA, ΔW = s·B·A, which is not the change this "
                            "variant applies")
    if ignored:
        count = sum(tensors.numel(k) for k in ignored)
        warnings.append(f"{len(ignored)} base-layer copies in the adapter file ({count:,} values) "
                        "are not counted as trainable parameters")
    modules, experts = [], []
    wrapped = _parameter_wrappers(grouped, config, weights) if config.target_parameters else {}
    for name, keys in sorted(grouped.items()):
        if name in wrapped:
            module, parameter = wrapped[name]
            checked = _check_parameter(module, parameter, keys, tensors, config, weights)
        else:
            checked = _check_module(name, keys, tensors, config, weights, warnings)
        if isinstance(checked, ExpertModule):
            experts.append(checked)
        elif checked is not None:
            modules.append(checked)
    return modules, experts, saved, warnings, ignored


def _parameter_wrappers(grouped: dict, config: AdapterConfig, weights: Path):
    """Saved module path -> (module, parameter) for PEFT's ParamWrapper layers. PEFT wraps a
    module's targeted parameters in the order its class defines them, each around the last, so the
    first sits deepest: `experts.base_layer.lora_A` is gate_up_proj's when down_proj is adapted too.
    """
    nested: dict[str, list[str]] = {}
    for name in grouped:
        module = name
        while module.endswith(".base_layer"):
            module = module[:-len(".base_layer")]
        nested.setdefault(module, []).append(name)
    wrapped = {}
    for module, names in nested.items():
        # PEFT's match: the path `module.param` equals a target or ends with `.target`.
        parameters = [t.rsplit(".", 1)[-1] for t in config.target_parameters
                      if f"{module}.{t.rsplit('.', 1)[-1]}" == t
                      or f"{module}.{t.rsplit('.', 1)[-1]}".endswith("." + t)]
        parameters = expert_parameter_order(list(dict.fromkeys(parameters)))
        if not parameters:
            continue
        if len(parameters) != len(names):
            raise AnalysisInputError(
                f"{weights}: {module} holds {len(names)} LoRA layers but target_parameters names "
                f"{len(parameters)} of its parameters ({', '.join(parameters)}); cannot tell which "
                "is which: re-save the adapter with PEFT")
        for name in names:
            depth = name.count(".base_layer") - module.count(".base_layer")
            wrapped[name] = (module, parameters[len(parameters) - 1 - depth])
    return wrapped


def _check_parameter(module: str, parameter: str, keys: dict, tensors: TensorFile,
                     config: AdapterConfig, weights: Path):
    """A ParamWrapper's LoRA: E experts of rank r each (lora_A rows = r·E), or one 2-D parameter."""
    keys.pop("_embedding")
    name = f"{module}.{parameter}"
    for needed in ("A", "B"):
        if needed not in keys:
            raise AnalysisInputError(f"{weights}: parameter {name} has no lora_{needed}; the "
                                     "adapter file is incomplete")
    extra = sorted(set(keys) - {"A", "B"})
    if extra:
        raise AnalysisInputError(f"{weights}: parameter {name} has {', '.join(extra)} beside its "
                                 "LoRA factors, which PEFT's target_parameters never saves")
    a_shape, b_shape = tensors.shape(keys["A"]), tensors.shape(keys["B"])
    r, alpha = config.rank_and_alpha(name)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] % r:
        raise AnalysisInputError(f"{weights}: parameter {name} has lora_A {a_shape} and lora_B "
                                 f"{b_shape}, not (r·E, in) and (out, r·E) with r={r} from "
                                 "adapter_config.json")
    experts = a_shape[0] // r
    shape = (b_shape[0], a_shape[1])
    if 0 in shape:
        raise AnalysisInputError(f"{weights}: parameter {name} has an empty ΔW; the adapter file is "
                                 "corrupt")
    scale = lora_scale(alpha, r, config.use_rslora)
    bound, finite = _factor_bound(tensors, keys, scale, r)
    if not bound <= MAX_DELTA_ENTRY:
        raise AnalysisInputError(f"{weights}: parameter {name} has values whose ΔW could reach "
                                 f"{bound:.1e}, beyond float64 analysis; the adapter is corrupt")
    if experts == 1:  # a 2-D parameter: PEFT's delta is a Linear's s·B·A
        return LoraModule(name=module if parameter == "weight" else name, kind="lora", rank=r,
                          alpha=alpha, scale=scale, shape=shape, keys=keys, factors_finite=finite)
    return ExpertModule(name=name, module=module, parameter=parameter, num_experts=experts,
                        rank=r, alpha=alpha, scale=scale, shape=shape, keys=keys,
                        factors_finite=finite)


def _check_module(name, keys, tensors, config, weights, warnings) -> LoraModule | None:
    embedding = keys.pop("_embedding")
    for needed in ("A", "B"):
        if needed not in keys:
            other = "B" if needed == "A" else "A"
            raise AnalysisInputError(f"{weights}: module {name} has lora_{other} but no "
                                     f"lora_{needed}; the adapter file is incomplete")
    a_shape, b_shape = tensors.shape(keys["A"]), tensors.shape(keys["B"])
    if len(a_shape) != 2 or len(b_shape) != 2:
        warnings.append(f"{name}: LoRA on a {len(a_shape)}-D (convolution) weight is not analysed")
        return None
    r, alpha = config.rank_and_alpha(name)
    # Linear/Conv1D: A [r, in], B [out, r]. Embedding: A [r, vocab], B [dim, r].
    rank_a, rank_b = a_shape[0], b_shape[1]
    if rank_a != rank_b:
        raise AnalysisInputError(f"{weights}: module {name} has lora_A {a_shape} and lora_B {b_shape}, "
                                 f"whose ranks ({rank_a} vs {rank_b}) contradict each other")
    if rank_a != r:
        raise AnalysisInputError(f"{weights}: module {name} has rank {rank_a} but "
                                 f"adapter_config.json says r={r} for it (r / rank_pattern)")
    shape = (a_shape[1], b_shape[0]) if embedding else (b_shape[0], a_shape[1])
    if 0 in shape:
        raise AnalysisInputError(f"{weights}: module {name} has lora_A {a_shape} and lora_B "
                                 f"{b_shape}, an empty ΔW; the adapter file is corrupt")
    out_features = b_shape[0]
    for part, expected in (("bias", out_features), ("magnitude", out_features)):
        if part in keys and tensors.shape(keys[part]) != [expected]:
            raise AnalysisInputError(f"{weights}: module {name} has a {part} of shape "
                                     f"{tensors.shape(keys[part])}, expected [{expected}]")
    scale = lora_scale(alpha, r, config.use_rslora)
    # |ΔW_ij| <= |s|·r·max|A|·max|B|, checked before any math (NaN/Inf are counted and reported
    # by the analysis; finite values this large would overflow its float64 products instead).
    bound, finite = _factor_bound(tensors, keys, scale, r)
    if not bound <= MAX_DELTA_ENTRY:
        raise AnalysisInputError(f"{weights}: module {name} has values whose ΔW could reach "
                                 f"{bound:.1e}, beyond float64 analysis; the adapter is corrupt")
    return LoraModule(name=name, kind="embedding" if embedding else "lora", rank=r, alpha=alpha,
                      scale=scale, shape=shape, keys=keys,
                      fan_in_fan_out=config.fan_in_fan_out and not embedding,
                      factors_finite=finite)


class BaseModel:
    """A local base model directory: config.json and (sharded) safetensors, read one tensor a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise AnalysisInputError(f"base model directory {self.path} does not exist")
        config_path = self.path / "config.json"
        try:
            self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise AnalysisInputError(f"cannot read {config_path}: {exc}") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise AnalysisInputError(f"base model directory {self.path} has no *.safetensors "
                                     "weights (only safetensors base models are read)")
        self._handles, self._shapes, self._file_of = {}, {}, {}
        for file in files:
            check_safetensors(file)
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise AnalysisInputError(f"base weights {file} are truncated or corrupt "
                                         f"({str(exc)[:200]})") from None
            self._handles[file] = handle
            for key in handle.keys():
                self._shapes[key] = list(handle.get_slice(key).get_shape())
                self._file_of[key] = file
        self.params = sum(math.prod(s) for s in self._shapes.values())

    def keys(self) -> list[str]:
        """Every tensor name across the (sharded) safetensors files."""
        return list(self._shapes)

    def shape(self, key: str) -> list[int]:
        return self._shapes[key]

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor as stored (dtype and orientation), read from its shard (full diffs)."""
        try:
            return self._handles[self._file_of[key]].get_tensor(key)
        except Exception as exc:
            raise AnalysisInputError(f"{self._file_of[key]}: cannot read tensor {key} ({exc}); "
                                     "the file is truncated or corrupt") from None

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        text = self.config.get("text_config")
        return text.get("num_hidden_layers") if isinstance(text, dict) else None

    @property
    def attention_config(self) -> dict:
        """The config holding head counts (multimodal models nest it under text_config)."""
        text = self.config.get("text_config")
        return text if isinstance(text, dict) and "num_attention_heads" in text else self.config

    def find(self, parameter: str) -> str | None:
        """The base key for an adapter parameter path, allowing for a prefix either side
        (`transformer.h.0...` in a GPT2ForSequenceClassification adapter vs `h.0...` in gpt2)."""
        parts = parameter.split(".")
        for start in range(len(parts) - 1):
            tail = ".".join(parts[start:])
            if tail in self._shapes:
                return tail
            hits = [k for k in self._shapes if k.endswith("." + tail)]
            if len(hits) == 1:
                return hits[0]
        return None

    def check(self, parameter: str, expected: tuple[int, ...], transposed: bool) -> str | None:
        """The base key for `parameter` after checking its shape (Linear orientation) against
        `expected`; None when the base has no such tensor. Conv1D weights are stored [in, out]."""
        key = self.find(parameter)
        if key is None:
            return None
        stored = self._shapes[key]
        oriented = stored[::-1] if transposed and len(stored) == 2 else stored
        if list(oriented) != list(expected):
            raise AnalysisInputError(f"base weight {key} has shape {stored} but the adapter needs "
                                     f"{list(expected)}{' (transposed, Conv1D)' if transposed else ''}: "
                                     f"is {self.path} the model this adapter was trained on?")
        return key

    def weight(self, parameter: str, expected: tuple[int, ...], transposed: bool, device,
               dtype=torch.float64) -> torch.Tensor | None:
        """The checked base tensor for `parameter` in Linear orientation, or None (see check)."""
        key = self.check(parameter, expected, transposed)
        if key is None:
            return None
        tensor = self._handles[self._file_of[key]].get_tensor(key).to(device=device, dtype=dtype)
        return tensor.T if transposed and tensor.ndim == 2 else tensor
