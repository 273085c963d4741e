"""Memory safety of the opt-in `.pt` reader (vla_jax.hf.pickle_io): tensors whose offset, shape or
strides reach outside their storage are a ValueError naming the file, never a crash or bytes from
outside the storage. Truth: torch.load of the same file. The fuzz runs in a subprocess, so a
segfault fails the test instead of killing pytest; the importer leaves no temporary folder behind."""

import collections
import io
import json
import os
import pickle
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = {"FloatStorage": torch.float32, "LongStorage": torch.int64, "HalfStorage": torch.float16,
          "ByteStorage": torch.uint8, "BFloat16Storage": torch.bfloat16}


class _StorageRef:
    def __init__(self, kind, key, numel):
        self.kind, self.key, self.numel = kind, key, numel


class _Tensor:
    """Pickles as torch.save writes a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def write_pt(path, kind, storage_bytes, offset, size, stride, numel=None):
    """A torch.save-layout zip holding {'t': tensor(offset, size, stride)} over one storage."""
    item = torch.empty(0, dtype=DTYPES[kind]).element_size()
    ref = _StorageRef(kind, "0", len(storage_bytes) // item if numel is None else numel)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({"t": _Tensor(ref, offset, size, stride)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", storage_bytes)
        z.writestr("archive/version", "3\n")


def case(rng):
    kind = rng.choice(sorted(DTYPES))
    item = torch.empty(0, dtype=DTYPES[kind]).element_size()
    n = rng.choice([0, 1, 2, 3, 5, 8, 12, 16])
    nd = rng.choice([0, 1, 1, 2, 2, 3])
    pick = lambda small, big: rng.choice(small) if rng.random() < 0.9 else rng.choice(big)  # noqa: E731
    size = [pick([0, 1, 1, 2, 3, 4, 5], [2**20, 2**31, 2**62]) for _ in range(nd)]
    stride = [pick([0, 1, 1, 2, 3, 4, 6, -1], [2**31, 2**62, -2**40]) for _ in range(nd)]
    offset = pick([0, 0, 1, 2, 5, 11, 16, 17, -1], [2**31, 2**62, -2**62])
    data = bytes(rng.getrandbits(8) for _ in range(n * item))
    if rng.random() < 0.1 and data:  # a truncated storage file: fewer bytes than the pickle claims
        return kind, data[:-1], offset, size, stride, n
    return kind, data, offset, size, stride, None


def fuzz(seed, count, folder):
    """Runs `count` random cases; exits 1 (printing the case) on any disagreement with torch.load."""
    from vla_jax.hf import pickle_io

    rng = random.Random(seed)
    stats = collections.Counter()
    for i in range(count):
        kind, data, offset, size, stride, numel = case(rng)
        path = os.path.join(folder, f"case{i % 4}.pt")
        write_pt(path, kind, data, offset, size, stride, numel)
        desc = f"case {i}: {kind} storage {len(data)} bytes (numel claim {numel}), offset {offset}, size {size}, " \
               f"stride {stride}"
        try:
            want = torch.load(path, weights_only=True)["t"]
        except Exception as e:  # noqa: BLE001 - torch refuses it: we must refuse it too
            want = e
        try:
            got = pickle_io.load_pt(path)["t"].load()
        except ValueError as e:
            msg = str(e)
            if path not in msg:
                print(f"{desc}: error without the file name: {msg}")
                sys.exit(1)
            if isinstance(want, Exception):
                stats["refused"] += 1
            elif "expand" in msg or "too large to represent" in msg:  # deliberate: memory bombs
                stats["refused by the size limits, torch makes a view"] += 1
            elif "non-negative" in msg:  # deliberate: torch accepts negative strides of empty tensors
                stats["refused as negative, torch loads it empty"] += 1
            else:
                print(f"{desc}: refused ({msg}) but torch.load loads it")
                sys.exit(1)
            continue
        if isinstance(want, Exception):
            print(f"{desc}: we returned {got.shape} {got.dtype} but torch.load refuses it ({want})")
            sys.exit(1)
        expect = want.view(torch.int16).numpy().view(got.dtype) if want.dtype == torch.bfloat16 else want.numpy()
        if got.shape != tuple(want.shape) or got.tobytes() != np.ascontiguousarray(expect).tobytes():
            print(f"{desc}: values differ from torch.load")
            sys.exit(1)
        stats["loaded, equal to torch"] += 1
    print(json.dumps(stats))


def test_fuzzed_layouts_give_a_clear_error_or_torchs_tensor(tmp_path):
    code = f"import sys; sys.path.insert(0, {REPO!r}); from tests.hf.test_pt_reader_bounds import fuzz; " \
           f"fuzz(0, 1500, {str(tmp_path)!r})"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"exit {res.returncode} (negative: killed by a signal)\n{res.stdout}\n{res.stderr[-3000:]}"
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    # The fuzz must exercise both outcomes (refusals other than torch's are checked in `fuzz`).
    assert stats.get("loaded, equal to torch", 0) > 100 and stats.get("refused", 0) > 100, stats


@pytest.mark.parametrize("offset,size,stride,what", [
    (0, [4], [1], "reaches element"),          # 4 elements over a 3-element storage: a small overrun
    (2, [2], [1], "reaches element"),
    (0, [2, 2], [1, 5], "reaches element"),
    (-1, [2], [1], "non-negative"),
    (0, [2], [-1], "non-negative"),
])
def test_an_out_of_bounds_tensor_names_file_and_layout(tmp_path, offset, size, stride, what):
    """Small overruns, in this process (far ones, which crash an unchecked reader, are in the fuzz)."""
    from vla_jax.hf import pickle_io

    path = str(tmp_path / "bad.pt")
    write_pt(path, "FloatStorage", np.arange(3, dtype=np.float32).tobytes(), offset, size, stride)
    with pytest.raises(ValueError, match=what) as e:
        pickle_io.load_pt(path)["t"].load()
    assert path in str(e.value)


def test_an_overrunning_prismatic_checkpoint_fails_cleanly_and_leaves_no_temporary_folder(tmp_path):
    """The importer on a real (tiny) Prismatic .pt whose last storage lost half its bytes, so its tensor
    reaches past it: exit status 2, one error naming the file, no output folder, nothing left beside
    it (run in a subprocess: a crash fails the test)."""
    from tests.hf.test_hf_base_and_pickle import CFG, _prismatic_checkpoint
    from tests.torch_reference import TorchOpenVLA
    from vla_jax.hf import config as hfc

    good, pt = tmp_path / "good.pt", tmp_path / "step-000001-epoch-00-loss=0.1000.pt"
    _prismatic_checkpoint(TorchOpenVLA(CFG).randomize(seed=1), good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(pt, "w") as dst:
        storages = [n for n in src.namelist() if "/data/" in n]
        victim = max(storages, key=lambda n: int(n.rsplit("/", 1)[1]))  # the llm's last tensor, read last
        for name in src.namelist():
            blob = src.read(name)
            dst.writestr(name, blob[: len(blob) // 2] if name == victim else blob)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps(hfc.config_to_hf(CFG, {}, "float32")))
    out = tmp_path / "out" / "work"
    out.parent.mkdir()
    tok = os.path.join(REPO, "tests", "fixtures", "data", "llama2_tokenizer", "tokenizer.model")
    res = subprocess.run([sys.executable, "-m", "vla_jax.hf", "import", str(pt), str(out), "--allow_pickle",
                          f"--hf_config={cfg_json}", f"--tokenizer={tok}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert str(pt) in res.stderr and victim in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert os.listdir(out.parent) == []
