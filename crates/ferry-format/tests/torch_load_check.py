#!/usr/bin/env python3
"""Check that files written by ferry-format load in Python as the tensors ferry meant.

Usage: torch_load_check.py DIR [--no-torch]

DIR holds files written by ferry (made by the `ferry-format` test `writer::torch_check_directory`,
which writes them into $FERRY_WRITE_TORCH_CHECK_DIR when that is set) and `expected.json`:

    {"file.ckpt": {"name": {"dtype": "bfloat16", "shape": [1, 5, 8], "sha256": "..."}, ...}, ...}

With torch installed, every `.ckpt` is loaded with `torch.load(path, weights_only=True)` (and
every `.safetensors` with `safetensors.torch.load_file` when that package is present), and each
tensor's dtype, shape and the SHA-256 of its contiguous little-endian bytes are compared.

Without torch (or with --no-torch), the `.ckpt` files are checked by CPython's own unpickler
with stand-ins for torch's rebuild functions and storage classes: the zip must pass `testzip()`
(CRC-32s), storages must start on 64-byte boundaries, and the bytes each tensor record points
at must hash as expected. This needs nothing but the standard library.

Exit status 0 when every check passes; failures are printed one per line.
"""

import hashlib
import json
import os
import pickle
import pickletools
import struct
import sys
import zipfile

STORAGE_DTYPES = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def check_with_torch(path, expected, failures):
    import torch

    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            print(f"note: safetensors not installed; skipping {path}")
            return
        loaded = load_file(path)
    else:
        loaded = torch.load(path, weights_only=True)
    if list(loaded.keys()) != list(expected.keys()) and not path.endswith(".safetensors"):
        failures.append(f"{path}: key order {list(loaded.keys())} != {list(expected.keys())}")
    for name, want in expected.items():
        if name not in loaded:
            failures.append(f"{path}: missing tensor {name!r}")
            continue
        t = loaded[name]
        got_dtype = str(t.dtype).removeprefix("torch.")
        if got_dtype != want["dtype"] or list(t.shape) != want["shape"]:
            failures.append(f"{path}: {name!r} is {got_dtype}{list(t.shape)}, want {want['dtype']}{want['shape']}")
            continue
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        data = bytes(flat.tolist())
        if sha256(data) != want["sha256"]:
            failures.append(f"{path}: {name!r} bytes differ")


class _Storage:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return ("tensor", storage, offset, tuple(size), tuple(stride))


def check_without_torch(path, expected, failures):
    if path.endswith(".safetensors"):
        raw = open(path, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        base = 8 + n
        for name, want in expected.items():
            info = header[name]
            s, e = info["data_offsets"]
            if sha256(raw[base + s : base + e]) != want["sha256"] or info["shape"] != want["shape"]:
                failures.append(f"{path}: {name!r} differs")
        return
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            failures.append(f"{path}: CRC mismatch in {bad}")
        infos = z.infolist()
        prefix = infos[0].filename.split("/")[0] + "/"
        raw = open(path, "rb").read()
        for info in infos:
            (name_len, extra_len) = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            if start % 64 != 0:
                failures.append(f"{path}: entry {info.filename} data at {start} is not 64-byte aligned")
        pkl = z.read(prefix + "data.pkl")
        pickletools.dis(pkl, out=open(os.devnull, "w"))

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor_v2
                if (module, name) == ("collections", "OrderedDict"):
                    import collections

                    return collections.OrderedDict
                if module == "torch" and name in STORAGE_DTYPES:
                    return _Storage(name)
                raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

            def persistent_load(self, pid):
                tag, cls, key, location, numel = pid
                assert tag == "storage" and location == "cpu", pid
                return (cls.name, key, numel)

        import io

        obj = Unpickler(io.BytesIO(pkl)).load()
        if list(obj.keys()) != list(expected.keys()):
            failures.append(f"{path}: key order {list(obj.keys())} != {list(expected.keys())}")
        for name, want in expected.items():
            _, (cls, key, numel), offset, size, stride = obj[name]
            dtype, elem = STORAGE_DTYPES[cls]
            data = z.read(prefix + "data/" + key)
            count = 1
            for d in size:
                count *= d
            if dtype != want["dtype"] or list(size) != want["shape"] or len(data) != numel * elem:
                failures.append(f"{path}: {name!r} record {dtype}{list(size)} numel={numel} does not match")
                continue
            if sha256(data[offset * elem : (offset + count) * elem]) != want["sha256"]:
                failures.append(f"{path}: {name!r} bytes differ")


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    root = sys.argv[1]
    use_torch = "--no-torch" not in sys.argv
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("note: torch is not installed; checking with the standard-library unpickler instead")
            use_torch = False
    expected = json.load(open(os.path.join(root, "expected.json")))
    failures = []
    for file_name, tensors in expected.items():
        path = os.path.join(root, file_name)
        try:
            (check_with_torch if use_torch else check_without_torch)(path, tensors, failures)
        except Exception as e:  # report and continue with the next file
            failures.append(f"{path}: {type(e).__name__}: {e}")
    for f in failures:
        print("FAIL", f)
    mode = "torch.load(weights_only=True)" if use_torch else "stdlib unpickler"
    print(f"{len(expected)} files checked with {mode}: {'ok' if not failures else f'{len(failures)} failures'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
