"""Print lmms-eval's install requirements minus torch, torchvision and timm (see setup.sh)."""

import importlib.metadata
import re

SKIP = {"torch", "torchvision", "timm"}

for requirement in importlib.metadata.requires("lmms-eval") or []:
    if "extra ==" in requirement:
        continue
    name = re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    if name not in SKIP:
        print(requirement)
