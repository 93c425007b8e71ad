"""OoD benchmark suites by name: an ID set, near and far OoD sets, the class names, the source.

``mmsphere score-ood --protocol cifar10 --data-root DIR`` finds each set of a suite under ``DIR``
at the first of its usual locations that exists: a folder (ImageFolder-like ``<class>/*.png``, or
images directly inside) or a list file (``.txt``, one ``relative/path [label]`` per line with paths
relative to ``DIR``: OpenOOD's ``benchmark_imglist`` layout with ``DIR`` = its ``images_classic/``
or ``images_largescale/``). ``--set NAME=PATH`` points one set elsewhere. No suite reads the CIFAR
python batches: they are pickles, which mmsphere never loads; use an image export of them.

A set that is not found stops the run (before the model loads) unless ``--allow-missing``, which
leaves it out and says so in every output. Your own suite is one :func:`register_ood_protocol`
call in a module given to ``--imports``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsphere.errors import ConfigError, DataError
from mmsphere.registry import Registry

ROLES = ("id", "near", "far")


@dataclass(frozen=True)
class OodSetSpec:
    """One set of a suite: its name, its role and where it usually lies under the data root."""

    name: str
    role: str  # "id", "near" or "far"
    locations: tuple[str, ...]  # relative to --data-root, tried in order: folders or .txt lists
    description: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"set {self.name!r}: role={self.role!r} must be one of {ROLES}")
        if not self.locations:
            raise ValueError(f"set {self.name!r}: locations must name at least one folder or list")


@dataclass(frozen=True)
class OodProtocol:
    """An OoD detection benchmark as data: the ID set and its classes, the near and far OoD sets, the source."""

    name: str
    version: str
    description: str
    source: str
    id_set: OodSetSpec
    ood_sets: tuple[OodSetSpec, ...]
    classes: tuple[str, ...] | None  # the ID class names for the prompts; None: --classes is needed
    templates: tuple[str, ...] = ("a photo of a {}.",)
    metrics: tuple[str, ...] = ("FPR95", "AUROC")
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.id_set.role != "id":
            problems.append(f"id_set {self.id_set.name!r} must have role 'id'")
        if not self.ood_sets or any(spec.role == "id" for spec in self.ood_sets):
            problems.append("ood_sets must hold at least one set, each with role 'near' or 'far'")
        names = [self.id_set.name, *(spec.name for spec in self.ood_sets)]
        if len(set(names)) != len(names) or {"id", "mean"} & set(names):
            problems.append(f"set names {names} must be distinct and not 'id' or 'mean'")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            problems.append("classes must be distinct")
        if problems:
            raise ValueError(f"OoD protocol {self.name!r}: {'; '.join(problems)}")

    def sets(self) -> tuple[OodSetSpec, ...]:
        """The ID set, then the OoD sets in order."""
        return (self.id_set, *self.ood_sets)

    def describe(self) -> str:
        """The definition in words (``mmsphere protocols NAME``): its sets and where they lie, classes, metrics."""
        lines = [f"{self.name} (version {self.version}): {self.description}", f"  source: {self.source}"]
        lines += [f"  {spec.role} set {spec.name}: first of {', '.join(spec.locations)} under --data-root"
                  + (f" — {spec.description}" if spec.description else "") for spec in self.sets()]
        lines.append(f"  classes: {len(self.classes)} shipped" if self.classes is not None
                     else "  classes: --classes FILE")
        lines.append(f"  reports: {', '.join(self.metrics)} per set, mean per role and overall")
        if self.notes:
            lines.append(f"  note: {self.notes}")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """What a results card records of the protocol."""
        return {"name": self.name, "version": self.version, "description": self.description, "source": self.source,
                "sets": {spec.name: {"role": spec.role, "locations": list(spec.locations)} for spec in self.sets()},
                "classes": "shipped" if self.classes is not None else "--classes", "metrics": list(self.metrics)}


@dataclass
class ResolvedSuite:
    """Where each set of a suite was found, and the sets that were not."""

    protocol: OodProtocol
    locations: dict[str, str]  # set name -> folder or list file, ID first
    not_found: dict[str, list[str]]  # set name -> the paths looked at

    @property
    def roles(self) -> dict[str, str]:
        """Role of every OoD set found."""
        return {spec.name: spec.role for spec in self.protocol.ood_sets if spec.name in self.locations}


OOD_PROTOCOLS: Registry[OodProtocol] = Registry("OoD protocol", OodProtocol,
                                                listing_hint="mmsphere protocols lists them with their sets")


def register_ood_protocol(protocol: OodProtocol) -> OodProtocol:
    """Make ``protocol`` available as ``score-ood --protocol <protocol.name>``."""
    return OOD_PROTOCOLS.register(getattr(protocol, "name", ""), protocol)


def get_ood_protocol(name: str) -> OodProtocol:
    """The registered OoD protocol ``name``; an unknown name lists the known ones."""
    return OOD_PROTOCOLS.lookup(name)


def resolve_suite(protocol: OodProtocol, data_root: str | os.PathLike,
                  overrides: dict[str, str] | None = None) -> ResolvedSuite:
    """Find every set of ``protocol`` under ``data_root`` (``overrides``: set name -> path, used as given)."""
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"--data-root {str(root)!r} is not a directory")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {spec.name for spec in protocol.sets()})
    if unknown:
        raise ConfigError(f"--set names {unknown} are not sets of protocol {protocol.name} "
                          f"({', '.join(spec.name for spec in protocol.sets())})")
    locations, not_found = {}, {}
    for spec in protocol.sets():
        candidates = ([Path(overrides[spec.name])] if spec.name in overrides
                      else [root / item for item in spec.locations])
        found = next((path for path in candidates if path.is_dir() or (path.is_file() and path.suffix == ".txt")),
                     None)
        if found is None:
            not_found[spec.name] = [str(path) for path in candidates]
        else:
            locations[spec.name] = str(found)
    if protocol.id_set.name in not_found:
        raise DataError(f"the ID set {protocol.id_set.name} of protocol {protocol.name} is not under "
                        f"{str(root)!r} (looked at {', '.join(not_found[protocol.id_set.name])}); "
                        f"pass --set {protocol.id_set.name}=PATH")
    return ResolvedSuite(protocol, locations, not_found)


# --------------------------------------------------------------------------------------------
# the shipped suites

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100's fine labels in label order, underscores as spaces for the prompts
CIFAR100_CLASSES = tuple(name.replace("_", " ") for name in (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split())

_CIFAR_FAR = (
    OodSetSpec("svhn", "far", ("svhn/test", "svhn", "SVHN"), "SVHN test digits"),
    OodSetSpec("textures", "far", ("dtd/images", "dtd", "textures", "Textures"), "Describable Textures (DTD)"),
    OodSetSpec("places365", "far", ("places365/test", "places365", "Places365", "Places"), "Places365"),
    OodSetSpec("lsun", "far", ("LSUN", "lsun", "LSUN_C"), "LSUN (crop), from the ODIN release"),
    OodSetSpec("isun", "far", ("iSUN", "isun"), "iSUN, from the ODIN release"),
)
_CIFAR_SOURCE = ("ID vs near (the other CIFAR) and far sets as in OpenOOD (Zhang et al. 2023) and the ODIN/MOS-era "
                 "benchmarks; scored zero-shot as MCM (Ming et al., NeurIPS 2022) and CMA (CVPR 2025) report")

register_ood_protocol(OodProtocol(
    name="cifar10",
    version="1",
    description="CIFAR-10 test as ID; CIFAR-100 near; SVHN, Textures, Places365, LSUN, iSUN far",
    source=_CIFAR_SOURCE,
    id_set=OodSetSpec("cifar10", "id", ("cifar10/test", "cifar10", "CIFAR10/test", "CIFAR10"), "CIFAR-10 test"),
    ood_sets=(OodSetSpec("cifar100", "near", ("cifar100/test", "cifar100", "CIFAR100/test", "CIFAR100"),
                         "CIFAR-100 test"), *_CIFAR_FAR),
    classes=CIFAR10_CLASSES,
))

register_ood_protocol(OodProtocol(
    name="cifar100",
    version="1",
    description="CIFAR-100 test as ID; CIFAR-10 near; SVHN, Textures, Places365, LSUN, iSUN far",
    source=_CIFAR_SOURCE,
    id_set=OodSetSpec("cifar100", "id", ("cifar100/test", "cifar100", "CIFAR100/test", "CIFAR100"), "CIFAR-100 test"),
    ood_sets=(OodSetSpec("cifar10", "near", ("cifar10/test", "cifar10", "CIFAR10/test", "CIFAR10"),
                         "CIFAR-10 test"), *_CIFAR_FAR),
    classes=CIFAR100_CLASSES,
))

register_ood_protocol(OodProtocol(
    name="imagenet1k-mos",
    version="1",
    description="ImageNet-1k val as ID; iNaturalist, SUN, Places, Textures (the MOS subsets) as far OoD",
    source=("MOS (Huang & Li, CVPR 2021) OoD subsets, the ImageNet-1k benchmark of MCM (Ming et al., NeurIPS 2022) "
            "and CMA (CVPR 2025)"),
    id_set=OodSetSpec("imagenet", "id", ("imagenet/val", "ImageNet/val", "imagenet_val", "val"), "ImageNet-1k val"),
    ood_sets=(
        OodSetSpec("inaturalist", "far", ("iNaturalist", "inaturalist"), "iNaturalist (MOS subset, 10,000 images)"),
        OodSetSpec("sun", "far", ("SUN", "sun"), "SUN (MOS subset, 10,000 images)"),
        OodSetSpec("places", "far", ("Places", "places"), "Places (MOS subset, 10,000 images)"),
        OodSetSpec("textures", "far", ("dtd/images", "dtd", "Textures", "textures"), "Textures (DTD, 5,640 images)"),
    ),
    classes=None,
    notes="the 1,000 class names are not shipped: --classes FILE, one name per line in the order of the class "
          "folders (e.g. the CLIP / MCM ImageNet class names)",
))
