"""Print lmms-eval's install requirements minus torch, torchvision and timm (see setup.sh), plus the
other pins of prunebench's `eval` extra (what lmms-eval needs but does not pin itself)."""

import importlib.metadata
import re

SKIP = {"torch", "torchvision", "timm"}


def name_of(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


for requirement in importlib.metadata.requires("lmms-eval") or []:
    if "extra ==" not in requirement and name_of(requirement) not in SKIP:
        print(requirement)
for requirement in importlib.metadata.requires("prunebench") or []:
    pin, _, marker = requirement.partition(";")
    if re.fullmatch(r"""\s*extra\s*==\s*["']eval["']\s*""", marker) and name_of(pin) != "lmms-eval":
        print(pin.strip())
