"""Print lmms-eval's install requirements minus torch, torchvision and timm (see setup.sh), plus the
other pins of prunebench's `eval` extra (what lmms-eval needs but does not pin itself)."""

import importlib.metadata

# packaging is a dependency of transformers, which setup.sh installs before running this
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SKIP = {"torch", "torchvision", "timm"}

for text in importlib.metadata.requires("lmms-eval") or []:
    requirement = Requirement(text)
    if "extra" not in str(requirement.marker or "") and canonicalize_name(requirement.name) not in SKIP:
        print(text)
for text in importlib.metadata.requires("prunebench") or []:
    requirement = Requirement(text)
    if str(requirement.marker) == 'extra == "eval"' and canonicalize_name(requirement.name) != "lmms-eval":
        requirement.marker = None
        print(requirement)
