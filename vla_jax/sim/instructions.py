"""One natural-language instruction per Meta-World task (Meta-World itself has none).

Keys are the task names without the '-v3' suffix; `resolve_task` accepts either form. The phrasing
names what the camera shows (the goal marker is red in reach tasks, green elsewhere).
"""

from __future__ import annotations

from typing import Dict, List

INSTRUCTIONS: Dict[str, str] = {
    "assembly": "put the ring on the peg",
    "basketball": "put the ball into the hoop",
    "bin-picking": "move the puck from the left bin to the right bin",
    "box-close": "put the lid on the box",
    "button-press-topdown": "press the button from the top",
    "button-press-topdown-wall": "press the button behind the wall from the top",
    "button-press": "press the button from the front",
    "button-press-wall": "press the button behind the wall",
    "coffee-button": "press the button of the coffee machine",
    "coffee-pull": "pull the mug out of the coffee machine",
    "coffee-push": "push the mug under the coffee machine",
    "dial-turn": "turn the dial",
    "disassemble": "take the ring off the peg",
    "door-close": "close the door",
    "door-lock": "lock the door",
    "door-open": "open the door",
    "door-unlock": "unlock the door",
    "hand-insert": "put the gripper into the hole",
    "drawer-close": "close the drawer",
    "drawer-open": "open the drawer",
    "faucet-open": "open the faucet",
    "faucet-close": "close the faucet",
    "hammer": "hammer the nail into the wall",
    "handle-press-side": "press the handle down from the side",
    "handle-press": "press the handle down",
    "handle-pull-side": "pull the handle up from the side",
    "handle-pull": "pull the handle up",
    "lever-pull": "pull the lever up",
    "peg-insert-side": "insert the peg into the hole from the side",
    "pick-place-wall": "pick up the puck and place it on the green marker behind the wall",
    "pick-out-of-hole": "pick the peg out of the hole",
    "reach": "move the gripper to the red marker",
    "push-back": "push the puck back to the green marker",
    "push": "push the puck to the green marker",
    "pick-place": "pick up the puck and place it on the green marker",
    "plate-slide": "slide the plate into the goal",
    "plate-slide-side": "slide the plate sideways into the goal",
    "plate-slide-back": "slide the plate back out of the goal",
    "plate-slide-back-side": "slide the plate sideways out of the goal",
    "peg-unplug-side": "unplug the peg from the side",
    "soccer": "kick the ball into the goal",
    "stick-push": "push the bottle with the stick",
    "stick-pull": "pull the bottle with the stick",
    "push-wall": "push the puck past the wall to the green marker",
    "reach-wall": "move the gripper to the red marker behind the wall",
    "shelf-place": "put the block on the shelf",
    "sweep-into": "sweep the puck into the hole",
    "sweep": "sweep the puck off the table",
    "window-open": "slide the window open",
    "window-close": "slide the window closed",
}

SUFFIX = "-v3"


def task_names() -> List[str]:
    """Sorted short names of every Meta-World v3 task (e.g. 'drawer-open')."""
    return sorted(INSTRUCTIONS)


def resolve_task(name: str) -> str:
    """'drawer-open' or 'drawer-open-v3' -> 'drawer-open-v3'; unknown names raise ValueError listing all."""
    if not isinstance(name, str):
        raise ValueError(f"task name must be a string, got {type(name).__name__}: {name!r}")
    short = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if short not in INSTRUCTIONS:
        raise ValueError(f"unknown Meta-World task {name!r}; valid tasks (with or without '{SUFFIX}'): "
                         + ", ".join(task_names()))
    return short + SUFFIX


def instruction_for(task: str) -> str:
    """The instruction of a task (either name form)."""
    return INSTRUCTIONS[resolve_task(task)[: -len(SUFFIX)]]
