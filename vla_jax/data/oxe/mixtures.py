"""Named dataset mixtures with OpenVLA's sampling weights.

Weights are raw and pre-balance: the pipeline multiplies each by the dataset's number of
transitions and normalizes (OpenVLA's `balance_weights=True`).
"""

from __future__ import annotations

from vla_jax.data.oxe.registry import HOW_TO_REGISTER, get_dataset_config, name_list, registered_datasets

# fmt: off
_RTX = [
    ("fractal20220817_data", 0.54087122203),
    ("kuka", 0.8341046294),
    ("bridge_orig", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 2.0),
    ("berkeley_cable_routing", 3.0),
    ("roboturk", 1.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 1.0),
    ("toto", 1.0),
]

# Shared by oxe_magic_soup_plus and _plus_minus (fractal's weight and the last three differ).
_MAGIC_SOUP_PLUS_CORE = [
    ("kuka", 0.8341046294),
    ("bridge_orig", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 1.0),
    ("berkeley_cable_routing", 1.0),
    ("roboturk", 2.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 2.0),
    ("toto", 1.0),
]
_MAGIC_SOUP_PLUS_REST = [
    ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
    ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
    ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
    ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
    ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
    ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
    ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
    ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
    ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
    ("utaustin_mutex", 1.0),
    ("berkeley_fanuc_manipulation", 2.0),
    ("cmu_stretch", 1.0),
]

MIXTURES: dict[str, list[tuple[str, float]]] = {
    "bridge": [("bridge_orig", 1.0)],
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    "rtx": list(_RTX),
    # OpenVLA's literal list is _RTX followed by Franka datasets that repeat taco_play,
    # berkeley_cable_routing, viola and toto (weight 1.0) and add berkeley_rpt (joint positions).
    # Its loader keeps the first of duplicate names and skips non-EEF datasets, so this is the
    # mixture it actually trains on.
    "rtx_franka": list(_RTX) + [
        ("stanford_hydra_dataset_converted_externally_to_rlds", 1.0),
        ("austin_buds_dataset_converted_externally_to_rlds", 3.0),
        ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
        ("maniskill_dataset_converted_externally_to_rlds", 0.1),
        ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
        ("cmu_franka_exploration_dataset_converted_externally_to_rlds", 5.0),
        ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
        ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
        ("kaist_nonprehensile_converted_externally_to_rlds", 3.0),
        ("stanford_robocook_converted_externally_to_rlds", 1.0),
        ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
        ("utaustin_mutex", 1.0),
        ("cmu_play_fusion", 1.0),
    ],
    # Octo's mix as OpenVLA trains it (v0.1 model); bc_z and uiuc_d3field are left out there.
    "oxe_magic_soup": [("fractal20220817_data", 0.54087122203)] + _MAGIC_SOUP_PLUS_CORE
                      + [("language_table", 0.1)] + _MAGIC_SOUP_PLUS_REST,
    "oxe_magic_soup_plus": [("fractal20220817_data", 0.54087122203)] + _MAGIC_SOUP_PLUS_CORE
                           + [("language_table", 0.1)] + _MAGIC_SOUP_PLUS_REST
                           + [("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2), ("droid", 0.06)],
    # openvla-7b's final mix: fractal at 1.0, no language_table, no droid.
    "oxe_magic_soup_plus_minus": [("fractal20220817_data", 1.0)] + _MAGIC_SOUP_PLUS_CORE
                                 + _MAGIC_SOUP_PLUS_REST
                                 + [("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2)],
    "droid_wipe": [("droid_wipe", 1.0)],
    "libero_spatial_no_noops": [("libero_spatial_no_noops", 1.0)],
    "libero_object_no_noops": [("libero_object_no_noops", 1.0)],
    "libero_goal_no_noops": [("libero_goal_no_noops", 1.0)],
    "libero_10_no_noops": [("libero_10_no_noops", 1.0)],
    "libero_mix": [
        ("libero_spatial_no_noops", 1.0),
        ("libero_object_no_noops", 1.0),
        ("libero_goal_no_noops", 1.0),
        ("libero_10_no_noops", 1.0),
    ],
}
# fmt: on


def register_mixture(name: str, entries, overwrite: bool = False) -> None:
    """Add a mixture: a list of (dataset_name, weight) with registered datasets and weights > 0."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"mixture name must be a non-empty string, got {name!r}")
    parsed = []
    for entry in entries:
        if len(entry) != 2:
            raise ValueError(f"mixture {name!r}: entry {entry!r} is not a (dataset, weight) pair")
        dataset, weight = entry
        get_dataset_config(dataset)  # unknown datasets fail here with the registry's message
        if not float(weight) > 0:
            raise ValueError(f"mixture {name!r}: weight of {dataset!r} must be > 0, got {weight!r}")
        parsed.append((dataset, float(weight)))
    if not parsed:
        raise ValueError(f"mixture {name!r} is empty")
    if name in MIXTURES and MIXTURES[name] != parsed and not overwrite:
        raise ValueError(f"mixture {name!r} already exists with other entries; pass overwrite=True to replace it")
    MIXTURES[name] = parsed


def get_mixture(name: str) -> list[tuple[str, float]]:
    """(dataset, weight) pairs of a named mixture; a registered dataset name gives [(name, 1.0)].

    A dataset listed twice keeps its first weight (as OpenVLA's loader does).
    """
    if name in MIXTURES:
        seen, out = set(), []
        for dataset, weight in MIXTURES[name]:
            if dataset not in seen:
                seen.add(dataset)
                out.append((dataset, float(weight)))
        return out
    if name in registered_datasets():
        return [(name, 1.0)]
    raise ValueError(f"{name!r} is neither a mixture nor a registered dataset. Mixtures: "
                     f"{name_list(MIXTURES, 100)}. Datasets ({len(registered_datasets())}): "
                     f"{name_list(registered_datasets(), 100)}. {HOW_TO_REGISTER}")
