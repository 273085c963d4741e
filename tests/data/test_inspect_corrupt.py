"""`python -m vla_jax.data.inspect` on a truncated or corrupted TFRecord: exit status 1 and one
error line naming the file (as training does), not a raw DataLossError traceback."""

import os
import shutil

import pytest

from vla_jax.data import inspect as inspect_cli

TRAIN = "bridge_dataset-train.tfrecord-00000-of-00001"


def damage(path, how):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(size // 2)
        else:  # one byte inside a record's payload: its CRC no longer matches
            f.seek(size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_inspect_names_the_damaged_file(bridge_data_dir, tmp_path, capsys, how):
    data = tmp_path / "data" / "bridge_dataset" / "1.0.0"
    shutil.copytree(bridge_data_dir / "bridge_dataset" / "1.0.0", data)
    damage(data / TRAIN, how)
    rc = inspect_cli.main([f"--data_dir={tmp_path / 'data'}", "--dataset=bridge_dataset",
                           f"--out={tmp_path / 'out'}", f"--stats_cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1 and str(data / TRAIN) in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out" / "bridge_dataset_report.json").exists()  # no report that looks valid
