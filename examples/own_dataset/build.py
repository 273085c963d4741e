"""Build the RLDS dataset from the recordings: what `tfds build` does, without its apache-beam dependency.

    python examples/own_dataset/build.py --manual_dir=RAW --data_dir=DATA

Writes DATA/my_robot_dataset/1.0.0/ (TFRecord shards + dataset_info.json), the folder vla_jax reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BUILDER_FILE = os.path.join(HERE, "my_robot_dataset", "my_robot_dataset_dataset_builder.py")


def build(manual_dir: str, data_dir: str) -> str:
    import tensorflow_datasets as tfds

    # tfds names a class called `Builder` after its module, `<name>_dataset_builder`.
    spec = importlib.util.spec_from_file_location("my_robot_dataset_dataset_builder", BUILDER_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # tfds looks the module up by name
    spec.loader.exec_module(module)
    builder = module.Builder(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.data_dir)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manual_dir", required=True, help="the recordings (train/*.npz, val/*.npz)")
    p.add_argument("--data_dir", required=True, help="where the TFDS builder folder goes")
    args = p.parse_args(argv)
    print(f"built {build(args.manual_dir, args.data_dir)}")


if __name__ == "__main__":
    main()
