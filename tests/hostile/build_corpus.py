"""Write the hostile-adapter corpus: tests/data/hostile/<case>/ and tests/data/hostile/cases.json.

    .venv/bin/python tests/hostile/build_corpus.py      # rewrites the committed corpus

Deterministic (fixed seeds, stdlib + safetensors/torch only) and small: every case is a tiny LoRA
adapter (r=4 on two 16x16 q_proj modules) broken one way. Each cases.json entry says what the case
is, how it must end (`failed` with `error` in the one-line message, or `done`), and how it ends when
it travels through MLflow (`via_mlflow`: false when it cannot be uploaded as such; `mlflow` when the
upload changes what the service sees, e.g. log_artifacts copies a symlink's target). Cases whose
files would be large (`at_test_time`) are not committed: tests call write_case() into tmp_path.
The pickle payloads create the file named by $TUNELENS_HOSTILE_MARKER if they are ever run.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

ROOT = Path(__file__).resolve().parents[1] / "data" / "hostile"
MARKER_ENV = "TUNELENS_HOSTILE_MARKER"
PREFIX = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
          "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "bias": "none"}


def lora_tensors(rank: int = 4, dim: int = 16, layers: int = 2, seed: int = 0) -> dict:
    """Valid A [r, dim] and B [dim, r] per layer, random so that ΔW != 0."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        tensors[PREFIX.format(layer, "A")] = torch.randn(rank, dim, generator=generator)
        tensors[PREFIX.format(layer, "B")] = torch.randn(dim, rank, generator=generator)
    return tensors


VALID = save_safetensors(lora_tensors())


def raw_safetensors(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file built by hand: 8-byte LE header length, header, data (any lie allowed)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def one_tensor(dtype="F32", shape=(4, 16), offsets=(0, 256), data_bytes=256, name="A") -> bytes:
    """A header naming one lora_A tensor (and its matching B, valid) with the given entries."""
    b_name, a_name = PREFIX.format(0, "B"), PREFIX.format(0, "A")
    header = {a_name: {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)},
              b_name: {"dtype": "F32", "shape": [16, 4],
                       "data_offsets": [data_bytes, data_bytes + 256]}}
    return raw_safetensors(header, bytes(data_bytes + 256))


class _System:
    """Pickles as os.system(<touch the marker>): what a hostile adapter_model.bin would carry."""

    def __reduce__(self):
        return os.system, (f'touch "${MARKER_ENV}"',)


class _Exec:
    def __reduce__(self):
        return exec, (f"import os; open(os.environ['{MARKER_ENV}'], 'w').write('ran')",)


def pickled(payload) -> bytes:
    """A plain pickle (torch's legacy .bin layout); protocol 2 and real module names."""
    return pickle.dumps(payload, protocol=2, fix_imports=False)


def torch_zip_with_global() -> bytes:
    """A genuine torch.save zip container (tensors included) whose data.pkl also calls os.system."""
    buffer = io.BytesIO()
    torch.save({**lora_tensors(), "payload": _System()}, buffer)
    return buffer.getvalue()


def torch_zip_truncated() -> bytes:
    buffer = io.BytesIO()
    torch.save(lora_tensors(), buffer)
    return buffer.getvalue()[:700]


def torch_zip_bomb() -> bytes:
    """torch.save's zip of a 16 MiB zero tensor with that member deflated: 16 KB unpacking to 16 MiB
    (the same 1000:1 ratio turns 4 MB into 4 GB)."""
    buffer = io.BytesIO()
    torch.save({PREFIX.format(0, "A"): torch.zeros(4 << 20)}, buffer)
    source, out = zipfile.ZipFile(buffer), io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            data = source.read(info.filename)
            if "/data/" in info.filename:
                info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return out.getvalue()


def torch_legacy() -> bytes:
    """torch.save's pre-1.6 format: pickles then raw storages, allocated at the declared size."""
    tensor, buffer = lora_tensors()[PREFIX.format(0, "A")], io.BytesIO()
    torch.save({PREFIX.format(0, "A"): tensor}, buffer, _use_new_zipfile_serialization=False)
    # Its storage key is a memory address: a same-length constant keeps the file deterministic
    # (one tensor, so the address order of storages cannot change the layout either).
    key = str(tensor.untyped_storage()._cdata)
    return buffer.getvalue().replace(key.encode(), b"0" * len(key))


def nested_json(depth: int) -> str:
    return json.dumps({**CONFIG, "nest": "@"}).replace('"@"', "[" * depth + "]" * depth)


def config(**changes) -> str:
    return json.dumps({**CONFIG, **changes})


def huge_rank() -> bytes:
    """r=100000 in the header (A [100000, 16]) with 512 bytes of data."""
    header = {PREFIX.format(0, "A"): {"dtype": "F32", "shape": [100000, 16],
                                      "data_offsets": [0, 6_400_000]},
              PREFIX.format(0, "B"): {"dtype": "F32", "shape": [16, 100000],
                                      "data_offsets": [6_400_000, 12_800_000]}}
    return raw_safetensors(header, bytes(512))


def nonfinite() -> bytes:
    tensors = lora_tensors()
    for key, tensor in tensors.items():
        tensor[::2] = float("nan")
        tensor[1::2] = float("inf") if "lora_A" in key else -float("inf")
    return save_safetensors(tensors)


def _with(**tensors) -> bytes:
    return save_safetensors(tensors)


SHARED = "_shared"  # not a case: the file the sibling-symlink case points at
# name, description, expected status, substring of the error, files ({name: content}: bytes or
# str, a function giving them (large cases), None to leave the file out, ("symlink", target)),
# extra fields.
W, C = "adapter_model.safetensors", "adapter_config.json"
CASES = [
    ("empty-weights", "adapter_model.safetensors is 0 bytes", "failed", "too short",
     {W: b""}),
    ("truncated-in-header", "valid file cut in the middle of its JSON header", "failed",
     "exceeds the file", {W: VALID[:40]}),
    ("truncated-in-data", "valid file cut in the middle of the tensor data", "failed",
     "past the end of the 924-byte data", {W: VALID[:-100]}),
    ("header-length-beyond-file", "length prefix says 1 MB, the file is 1 KB", "failed",
     "exceeds the file", {W: raw_safetensors({}, bytes(900), length=1 << 20)}),
    ("header-length-2-63", "length prefix 2^63", "failed", "header length 9,223,372,036",
     {W: raw_safetensors({}, bytes(64), length=1 << 63)}),
    ("header-not-json", "header bytes are not JSON", "failed", "header is not JSON",
     {W: raw_safetensors(b"{not json at all", bytes(16))}),
    ("header-not-object", "header is a JSON array", "failed", "not an object",
     {W: raw_safetensors([1, 2, 3])}),
    ("header-entry-not-object", "a tensor entry is a number", "failed",
     "is not an object with dtype", {W: raw_safetensors({PREFIX.format(0, "A"): 5})}),
    ("offsets-overlap", "A and B share the same bytes", "failed", "overlapping or gapped",
     {W: raw_safetensors({PREFIX.format(0, "A"): {"dtype": "F32", "shape": [4, 16],
                                                  "data_offsets": [0, 256]},
                          PREFIX.format(0, "B"): {"dtype": "F32", "shape": [16, 4],
                                                  "data_offsets": [0, 256]}}, bytes(512))}),
    ("offsets-beyond-file", "A's data_offsets start 1 TB past the end of the file", "failed",
     "past the end of the 512-byte data", {W: one_tensor(offsets=(1 << 40, (1 << 40) + 256))}),
    ("offsets-end-before-start", "data_offsets [256, 0]", "failed", "span -256",
     {W: one_tensor(offsets=(256, 0))}),
    ("offsets-not-covering", "512 trailing bytes no tensor claims", "failed",
     "the tensors cover", {W: VALID + bytes(512)}),
    ("offsets-negative", "data_offsets [-256, 0]", "failed", "not [start, end]",
     {W: one_tensor(offsets=(-256, 0))}),
    ("declares-1e12-elements", "A declared [10^6, 10^6] F32 (4 TB) over 256 bytes", "failed",
     "needs 4,000,000,000,000 bytes", {W: one_tensor(shape=(10 ** 6, 10 ** 6))}),
    ("dtype-i64", "lora_A stored as I64 (a valid safetensors dtype, not a weight)", "failed",
     "dtype 'I64'", {W: one_tensor(dtype="I64", data_bytes=512, offsets=(0, 512))}),
    ("dtype-bool", "lora_A stored as BOOL", "failed", "dtype 'BOOL'",
     {W: one_tensor(dtype="BOOL", data_bytes=64, offsets=(0, 64))}),
    ("dtype-q4-unknown", "made-up dtype Q4", "failed", "dtype 'Q4'", {W: one_tensor(dtype="Q4")}),
    ("shape-negative", "shape [-4, 16]", "failed", "not a list of non-negative ints",
     {W: one_tensor(shape=(-4, 16))}),
    ("shape-not-ints", "shape [\"4\", 16.0]", "failed", "not a list of non-negative ints",
     {W: one_tensor(shape=("4", 16.0))}),
    ("zero-tensors", "a valid safetensors file with no tensors", "failed", "holds no LoRA tensors",
     {W: raw_safetensors({})}),
    ("no-lora-keys", "only lora_-less names (a base-layer copy)", "failed",
     "holds no LoRA tensors",
     {W: _with(**{"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight":
                  torch.ones(16, 16)})}),
    ("missing-lora-b", "lora_A without its lora_B", "failed", "has lora_A but no lora_B",
     {W: _with(**{PREFIX.format(0, "A"): torch.ones(4, 16)})}),
    ("mismatched-ab-ranks", "lora_A rank 4, lora_B rank 6", "failed", "contradict each other",
     {W: _with(**{PREFIX.format(0, "A"): torch.ones(4, 16),
                  PREFIX.format(0, "B"): torch.ones(16, 6)})}),
    ("zero-size-in", "lora_A [4, 0]: a module with no input features", "failed", "an empty ΔW",
     {W: _with(**{PREFIX.format(0, "A"): torch.ones(4, 0),
                  PREFIX.format(0, "B"): torch.ones(16, 4)})}),
    ("zero-size-out", "lora_B [0, 4]: a module with no output features", "failed", "an empty ΔW",
     {W: _with(**{PREFIX.format(0, "A"): torch.ones(4, 16),
                  PREFIX.format(0, "B"): torch.ones(0, 4)})}),
    ("rank-not-config-r", "tensors of rank 4, adapter_config.json r=8", "failed",
     "says r=8", {W: VALID, C: config(r=8)}),
    ("huge-rank-tiny-data", "r=100000 in config and header over 512 bytes", "failed",
     "data_offsets [0, 6400000] past the end", {W: huge_rank(), C: config(r=100000)}),
    ("rank-above-module", "r=40 on 16x16 modules (consistent data): wasteful but valid, "
     "ΔW has rank <= 16", "done", None,
     {W: save_safetensors(lora_tensors(rank=40)), C: config(r=40)}),
    ("nan-inf-everywhere", "every A/B value NaN or ±Inf: analysed, with the nonfinite warning",
     "done", None, {W: nonfinite()}),
    ("config-missing", "no adapter_config.json", "failed", "no adapter_config.json", {C: None},
     {"mlflow": {"expected": "skipped", "error": "adapter_config.json",
                 "note": "the service skips a version without a PEFT config: not an adapter"}}),
    ("config-not-json", "adapter_config.json is not JSON", "failed", "is not valid JSON",
     {C: "{'peft_type': 'LORA',"}),
    ("config-json-array", "adapter_config.json is a JSON array", "failed",
     "must hold a JSON object", {C: json.dumps([CONFIG])}),
    ("config-peft-type-ia3", "peft_type IA3", "failed", "analyses LoRA adapters only",
     {C: config(peft_type="IA3")},
     {"mlflow": {"expected": "skipped", "error": "not LORA",
                 "note": "the service skips PEFT adapters that are not LoRA"}}),
    ("config-r-zero", "r = 0", "failed", "r must be a positive integer, got 0", {C: config(r=0)}),
    ("config-r-negative", "r = -1", "failed", "r must be a positive integer, got -1",
     {C: config(r=-1)}),
    ("config-r-string", "r = \"8\"", "failed", "r must be a positive integer, got '8'",
     {C: config(r="8")}),
    ("config-r-1e9", "r = 1e9 (a JSON float)", "failed",
     "r must be a positive integer, got 1000000000.0", {C: config(r=1e9)}),
    ("config-alpha-nan-string", "lora_alpha = \"NaN\"", "failed", "lora_alpha must be a number",
     {C: config(lora_alpha="NaN")}),
    ("config-alpha-nan-literal", "lora_alpha = NaN (JSON extension Python accepts)", "failed",
     "lora_alpha must be a number", {C: config(lora_alpha=float("nan"))}),
    ("config-alpha-1e308", "lora_alpha = 1e308: ΔW overflows float64", "failed",
     "lora_alpha must be a number of magnitude at most 1e+06", {C: config(lora_alpha=1e308)}),
    ("rank-pattern-not-int", "rank_pattern {\"q_proj\": \"x\"}", "failed",
     "rank_pattern must map module patterns to positive integers",
     {C: config(rank_pattern={"q_proj": "x"})}),
    ("alpha-pattern-nan", "alpha_pattern {\"q_proj\": NaN}", "failed",
     "alpha_pattern must map module patterns to numbers",
     {C: config(alpha_pattern={"q_proj": float("nan")})}),
    ("rank-pattern-bad-regex", "rank_pattern key \"(\" (re.error)", "failed",
     "is not a regular expression", {C: config(rank_pattern={"(": 4})}),
    ("rank-pattern-redos", "rank_pattern key \"((.*)*)*z\": exponential backtracking on every "
     "module name (hung > 120 s unchecked)", "failed", "repeats a group",
     {C: config(rank_pattern={"((.*)*)*z": 4})}),
    ("rank-pattern-too-many", "rank_pattern with 200,000 keys (8 MB; every module is matched "
     "against every key: hours of regex work; written at test time)", "failed",
     "has 200,000 patterns, more than the 4,096",
     {C: lambda: config(rank_pattern={f"layers.{i}.q_proj": 4 for i in range(200_000)})},
     {"at_test_time": True}),
    ("weights-overflow-f64", "finite F64 A/B values of 1e300: ΔW overflows float64", "failed",
     "beyond float64 analysis", {W: save_safetensors({k: v.double() * 1e300
                                                      for k, v in lora_tensors().items()})}),
    ("config-deeply-nested", "adapter_config.json nests 3000 lists (6 KB)", "failed",
     "nested too deeply", {C: nested_json(3000)}),
    ("config-nested-1e6", "adapter_config.json nests 10^6 lists (2 MB, written at test time)",
     "failed", "nested too deeply", {C: lambda: nested_json(10 ** 6)}, {"at_test_time": True}),
    ("config-50mb", "a 50 MB adapter_config.json (written at test time)", "failed",
     "-byte limit for a config file",
     {C: lambda: json.dumps({**CONFIG, "padding": "x" * 50_000_000})}, {"at_test_time": True}),
    ("header-over-16mib", "a well-formed 17 MiB safetensors header (written at test time)",
     "failed", "16,777,216-byte limit",
     {W: lambda: raw_safetensors(b"{" + b" " * (17 << 20) + b"}")}, {"at_test_time": True}),
    ("symlink-weights-etc-passwd", "adapter_model.safetensors -> /etc/passwd", "failed",
     "outside the adapter directory", {W: ("symlink", "/etc/passwd")},
     {"mlflow": {"expected": "failed", "error": "corrupt or not safetensors",
                 "note": "log_artifacts follows the link and uploads /etc/passwd's bytes as a "
                         "regular file; the service refuses them as not safetensors"}}),
    ("symlink-weights-sibling", "adapter_model.safetensors -> ../_shared/adapter_model.safetensors",
     "failed", "outside the adapter directory",
     {W: ("symlink", f"../{SHARED}/adapter_model.safetensors")},
     {"mlflow": {"expected": "done", "error": None,
                 "note": "log_artifacts uploads the sibling's valid weights as a regular file, "
                         "so the service sees (and analyses) a valid adapter"}}),
    ("symlink-config-etc-passwd", "adapter_config.json -> /etc/passwd", "failed",
     "outside the adapter directory", {C: ("symlink", "/etc/passwd")},
     {"mlflow": {"expected": "failed", "error": "is not valid JSON",
                 "note": "log_artifacts uploads /etc/passwd's bytes as adapter_config.json"}}),
    ("sharded-index-dotdot", "only adapter_model.safetensors.index.json naming "
     "../x.safetensors: the loader reads no index, so `..` is never followed", "failed",
     "neither adapter_model.safetensors nor adapter_model.bin",
     {W: None, "adapter_model.safetensors.index.json":
      json.dumps({"metadata": {}, "weight_map": {PREFIX.format(0, "A"): "../x.safetensors"}})}),
    ("pickle-bin-os-system", "adapter_model.bin = pickle of os.system(touch $MARKER)", "failed",
     "not a torch.save zip archive", {W: None, "adapter_model.bin": pickled(_System())}),
    ("pickle-bin-exec", "adapter_model.bin = pickle of builtins.exec(<write $MARKER>)", "failed",
     "not a torch.save zip archive", {W: None, "adapter_model.bin": pickled(_Exec())}),
    ("torch-zip-malicious-global", "adapter_model.bin: a real torch.save zip with tensors and a "
     "posix.system global in data.pkl", "failed", "names posix.system",
     {W: None, "adapter_model.bin": torch_zip_with_global()}),
    ("torch-zip-truncated", "adapter_model.bin: torch.save zip cut at 700 bytes", "failed",
     "not a torch.save zip archive", {W: None, "adapter_model.bin": torch_zip_truncated()}),
    ("torch-zip-bomb", "adapter_model.bin: torch.save zip whose 16 MiB tensor is deflated to 16 KB",
     "failed", "has compressed members (16,777,", {W: None, "adapter_model.bin": torch_zip_bomb()}),
    ("torch-legacy-format", "adapter_model.bin in torch's pre-1.6 (non-zip) format", "failed",
     "not a torch.save zip archive", {W: None, "adapter_model.bin": torch_legacy()}),
]


def write_case(case_dir: Path, files: dict) -> None:
    """One adapter directory: the valid config and weights, with `files` replacing or removing."""
    case_dir.mkdir(parents=True, exist_ok=True)
    for name, content in {C: json.dumps(CONFIG), W: VALID, **files}.items():
        path = case_dir / name
        if content is None:
            continue
        content = content() if callable(content) else content
        if isinstance(content, tuple):
            path.symlink_to(content[1])
        else:
            path.write_bytes(content.encode() if isinstance(content, str) else content)


def files_of(name: str) -> dict:
    return next(case[4] for case in CASES if case[0] == name)


def main(root: Path = ROOT) -> None:
    if root.exists():
        shutil.rmtree(root)
    write_case(root / SHARED, {})
    listing = []
    for name, description, expected, error, files, *extra in CASES:
        extra = extra[0] if extra else {}
        if not extra.get("at_test_time"):
            write_case(root / name, files)
        listing.append({"name": name, "description": description, "expected": expected,
                        "error": error, "via_mlflow": True, **extra})
    (root / "cases.json").write_text(json.dumps(listing, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(listing)} cases in {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
